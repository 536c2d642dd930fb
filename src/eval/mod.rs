//! Evaluation with the reference tools' exact conventions: COCO bbox AP (pycocotools) and
//! semantic segmentation mIoU (mmsegmentation).

pub mod coco;
pub mod seg;
