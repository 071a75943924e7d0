# DINOv2's linear segmentation protocol on ADE20K in mmsegmentation 1.x
# (task `mmseg:configs/mmseg/ade20k_dinov2_linear.py`).
#
# Backbone: any fnabench model served by FnabenchBackbone (the sweep's model replaces `model` below; the head's
# width follows it): the patch tokens of the last block through the final LayerNorm, 37 x 37 of them per
# 512-px crop window (padded to 518 px, a multiple of the 14-px patch, as DINOv2's code pads), + CLS = 1370
# tokens. Head: BatchNorm + 1x1 convolution (LinearBNHead, DINOv2's parameter names bn / conv_seg).
# Test: mmseg's ADE20K pipeline (short side 512), sliding 512-px windows with stride 341, mIoU over 150 classes.
#
# Needs on disk: ADE20K at data/ade/ADEChallengeData2016 (images/validation, annotations/validation; or the
# sweep's task option data_root), and a trained head per backbone (task option checkpoint, a table by model:
# a head trained with `python -m fnabench.tasks.mmseg_train` on this config, or DINOv2's published
# dinov2_vit{s,b,l}14_ade20k_linear_head.pth; if a published head's bn holds 2 x width channels it was trained
# with the CLS token concatenated: set cls_token=True). A head that does not fit fails its cell in one line.
_base_ = ['mmseg::_base_/datasets/ade20k.py', 'mmseg::_base_/default_runtime.py']
custom_imports = dict(imports=['fnabench.adapters.mmseg'], allow_failed_imports=False)

crop_size = (512, 512)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=crop_size)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='FnabenchBackbone',
        model='timm:vit_small_patch14_dinov2.lvd142m',
        image_size=518,
        out_indices=[-1],
        final_norm=True,
        cls_token=False,
        frozen=True),
    decode_head=dict(
        type='LinearBNHead',
        in_channels=[384],
        in_index=[0],
        input_transform='resize_concat',
        channels=384,
        dropout_ratio=0.0,
        num_classes=150,
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)))

# training a head here (DINOv2 trains 40k iterations at batch 16 on 8 GPUs; this is one GPU's share)
train_dataloader = dict(batch_size=16, num_workers=8)
val_dataloader = dict(batch_size=1, num_workers=4)
test_dataloader = val_dataloader
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3, weight_decay=1e-4))
param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=1.0, begin=0, end=40000, by_epoch=False)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=40000, val_interval=4000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=4000, save_optimizer=False))
