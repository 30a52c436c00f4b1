"""Person masks for frames: the masks stage's weak labels (YOLOv8 person boxes prompt SAM), or masks the
user brings; evaluate reads exact masks through the same reader.

Modules:
    weights   where the YOLO and SAM weights come from (local file, or a checked download when online), and
              loading them
    detect    PersonDetector (YOLO), SamBoxSegmenter (SAM) and YoloSamLabeler, which unites them into one
              FrameLabel per frame; label_fingerprint, the hash of what changes the labels
    refine    refine_mask: labels.refine's clean-up of a raw mask
    cache     LabelCache: FrameLabels kept by frame content, so no frame goes to SAM twice
    imported  mask_files (the one reader of a mask folder and its index CSV), read_binary_mask, is_uniform

Import from the modules (`from charseg.labels.imported import mask_files`); this package holds no code.
"""
