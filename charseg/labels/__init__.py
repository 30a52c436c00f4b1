"""Person masks for frames: the masks stage's weak labels (YOLO person boxes prompt a SAM-family model, or a
YOLO segmentation model's own masks), or masks the user brings; evaluate reads exact masks through the same
reader.

Modules:
    weights      where the YOLO and SAM-family weights come from (local file, or a checked download when
                 online), which backend labels.sam.model names, and loading them
    detect       build_labeler (the one constructor, for the stage and its workers); PersonDetector (YOLO),
                 SamBoxSegmenter (segment-anything vit_*), YoloSamLabeler and YoloSegLabeler, which make one
                 FrameLabel per frame; label_fingerprint, the hash of what changes the labels
    sam_family   UltralyticsSamSegmenter: MobileSAM, SAM, SAM 2 / 2.1 through ultralytics, box-prompted
    encoder_onnx a SAM image encoder exported once and run on onnxruntime (labels.sam.runtime onnx)
    refine       refine_mask: labels.refine's clean-up of a raw mask
    cache        LabelCache: FrameLabels kept by frame content, so no frame is labelled twice
    imported     mask_files (the one reader of a mask folder and its index CSV), read_binary_mask, is_uniform

Import from the modules (`from charseg.labels.imported import mask_files`); this package holds no code.
"""
