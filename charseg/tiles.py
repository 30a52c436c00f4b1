"""Contact sheets of the QA plots (masks, identity): picks spread evenly over a sequence, tiles in a grid."""
from __future__ import annotations

import numpy as np


def spread_indices(count: int, picks: int) -> list[int]:
    """Up to `picks` distinct indices into a sequence of `count`, ascending, evenly spread from first to last."""
    if count <= 0 or picks <= 0:
        return []
    return sorted(set(np.linspace(0, count - 1, min(picks, count)).round().astype(int).tolist()))


def tile_grid(tiles: list[np.ndarray], columns: int) -> np.ndarray:
    """Equal-width (H, W, 3) tiles in rows of `columns`, each padded at the bottom to the tallest; black cells
    fill the last row."""
    height = max(t.shape[0] for t in tiles)
    cells = [np.pad(t, ((0, height - t.shape[0]), (0, 0), (0, 0))) for t in tiles]
    cells += [np.zeros_like(cells[0])] * (-len(cells) % columns)
    return np.vstack([np.hstack(cells[i:i + columns]) for i in range(0, len(cells), columns)])
