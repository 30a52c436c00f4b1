"""ultralytics' SAM family (MobileSAM, SAM, SAM 2, SAM 2.1) behind the Segmenter protocol of detect.py.

Same box prompting as segment-anything's vit_* models: one image embedding per frame, then all of
the frame's boxes decoded in one call, one mask and one predicted-IoU score per box. ultralytics'
own predictor does the letterboxing to the square input (labels.sam.image_size: 1024 as trained, or
smaller and faster) and the mask upscaling back to the frame.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from charseg.labels.weights import configure_ultralytics, is_sam2


class UltralyticsSamSegmenter:
    """Box prompts on an ultralytics SAMModel/SAM2Model at `image_size` (the square input side, which the
    predictor sets on the model before each frame); `half` runs it in float16 on CUDA."""

    def __init__(self, model: torch.nn.Module, backend: str, *, image_size: int, device: torch.device | str = "cpu",
                 half: bool = False):
        configure_ultralytics()
        from ultralytics.models.sam.predict import Predictor, SAM2Predictor

        device = torch.device(device)
        predictor_class = SAM2Predictor if is_sam2(backend) else Predictor
        # quantize=16 is ultralytics 8.4's half precision; it applies it on CUDA only.
        overrides = {"imgsz": image_size, "device": str(device), "verbose": False, "save": False,
                     "quantize": 16 if half and device.type == "cuda" else None}
        self.predictor: Any = predictor_class(overrides=overrides)
        # ultralytics' device selection sets torch's CPU threads to cpu_count - 1 for the whole process:
        # give the rest of the stage its threads back (as PersonDetector does).
        threads = torch.get_num_threads()
        try:
            self.predictor.setup_model(model=model, verbose=False)
        finally:
            torch.set_num_threads(threads)
        self.backend = backend

    @property
    def model(self) -> torch.nn.Module:
        return self.predictor.model

    def segment(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, H, W) bool masks and the predicted IoU per box, for a BGR frame and (n, 4) xyxy boxes."""
        predictor = self.predictor
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        try:
            with torch.inference_mode():
                predictor.set_image(image)  # BGR, as ultralytics reads frames
                # ultralytics' prompt path of SAM.predict(bboxes=...) on the stored embedding, without its
                # score filter (conf): every box gets its mask, (n, H, W) bool at the frame's size.
                masks, boxes_scores = predictor.inference_features(predictor.features, image.shape[:2], bboxes=boxes)
            return masks.cpu().numpy(), boxes_scores[:, 4].float().cpu().numpy()
        finally:
            predictor.reset_image()  # the embedding is several MB per frame: do not keep it alive
