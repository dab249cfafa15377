#!/usr/bin/env bash
# The small default run on a fresh machine, end to end:
#   1. ./.venv with torch, timm, timm-mkd; Debian's Fashion-MNIST (scripts/setup_env.sh)
#   2. timm's train.py for the installed timm (TIMM_TRAIN_PY, or a clone of pytorch-image-models)
#   3. a resnet18 teacher trained by timm's own train.py (1 epoch, no strong augmentation)
#   4. an MKD ViT student with RandAugment + mixup/cutmix via train_mkd.py (1 epoch)
# Outputs land in ./output/quickstart/{teacher,student}; the student's temperatures.csv and
# temperatures.png show the learned temperatures. About 10 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=.venv/bin/python

# Fashion-MNIST for torchvision (unpacked IDX files under ROOT/FashionMNIST/raw).
ROOT=$($PY -m timm_mkd.fashion_mnist)

TRAIN_PY=${TIMM_TRAIN_PY:-}
if [ -z "$TRAIN_PY" ]; then
    VERSION=$($PY -c "import timm; print(timm.__version__)")
    CLONE=.cache/pytorch-image-models
    if [ ! -d "$CLONE" ]; then
        mkdir -p .cache
        git clone --quiet --filter=blob:none https://github.com/huggingface/pytorch-image-models "$CLONE"
    fi
    mkdir -p .cache/train_py
    TRAIN_PY=.cache/train_py/train.py
    git -C "$CLONE" show "v$VERSION:train.py" > "$TRAIN_PY"
fi
export TIMM_TRAIN_PY="$TRAIN_PY"
OUT=output/quickstart
COMMON=(--dataset torch/fashion_mnist --data-dir "$ROOT" --train-split train --val-split test
        --device cpu --in-chans 1 --input-size 1 32 32 --mean 0.2860 --std 0.3530 --num-classes 10 --workers 2
        --batch-size 128 --epochs 1 --warmup-epochs 0 --opt adamw --lr 2e-3 --weight-decay 0.05
        --output "$OUT" --log-interval 50)

if [ ! -f "$OUT/teacher/last.pth.tar" ]; then
    $PY "$TRAIN_PY" "${COMMON[@]}" --model resnet18 --experiment teacher --hflip 0.5
fi
rm -rf "$OUT/student"
$PY train_mkd.py "${COMMON[@]}" --experiment student \
    --model vit_tiny_patch16_224 --model-kwargs img_size=32 patch_size=4 depth=4 embed_dim=96 num_heads=3 \
    --aa rand-m9-mstd0.5 --mixup 0.8 --cutmix 1.0 --smoothing 0.1 \
    --teacher resnet18 --teacher-checkpoint "$OUT/teacher/last.pth.tar" --mkd
$PY -m timm_mkd.plot "$OUT/student"
echo "done: $OUT/student/summary.csv (tau_t, tau_s per epoch), $OUT/student/temperatures.png"
