"""charseg: character segmentation for TV video.

The library behind the DVC stages (`stages/<name>.py`, thin entry points) and the `charseg` command.
"""
