#!/usr/bin/env bash
# The checks of issue 4 that need a CUDA GPU, in one go: training steps under bf16 and fp16 AMP
# with channels_last for each model family, resume, predict + score on the GPU, two processes
# under torchrun sharing one GPU, and benchmarks/train_vs_reference.py on the GPU.
#
#   bash benchmarks/gpu_checks.sh OUT_DIR                 # on a CUDA machine: everything, ~19 minutes
#   PARTS="breakdown ablation" bash benchmarks/gpu_checks.sh OUT_DIR   # some parts: tests (~1 min),
#                                     # smoke (~4 min), bench (~6 min), ablation (~4 min), breakdown (~6 min),
#                                     # predict (~2 min: benchmarks/predict_speed.py, ResNet-50 and MobileNet at 512 px)
#   DEVICE=cpu SCALE=small bash benchmarks/gpu_checks.sh /tmp/dry   # a dry run of the script on CPU
#
# The ablation trains our side of the ResNet-50 benchmark with one part of our recipe changed at a
# time (no gradient clipping; no affine/brightness augmentation; constant learning rate after the
# warm-up, as the reference has it), to find what costs it mAP against the reference in short runs.
#
# Every step has its own time limit and log (OUT_DIR/NAME.log); a failing step does not stop the
# others, and the summary at the end lists each step's exit status and seconds.
set -u
out=${1:?usage: bash benchmarks/gpu_checks.sh OUT_DIR}
device=${DEVICE:-cuda}
scale=${SCALE:-full}
parts=" ${PARTS:-tests smoke bench ablation breakdown predict} "
py=${PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
export PYTHONUNBUFFERED=1
summary="$out/summary.txt"
: > "$summary"

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2 started rc
    shift 2
    started=$(date +%s)
    echo "=== $name: $*"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc, $(( $(date +%s) - started )) s" | tee -a "$summary"
    tail -n 12 "$out/$name.log"
}
# `lungdet` without installing the package: this checkout on PYTHONPATH and a two-line launcher.
repo=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$work/bin"
printf '#!/usr/bin/env bash\nexec %q -m lungdet "$@"\n' "$(command -v "$py")" > "$work/bin/lungdet"
chmod +x "$work/bin/lungdet"
export PATH="$work/bin:$PATH"
cd "$repo"

if [ "$scale" = small ]; then count=24; bench_count=40; bench_epochs=2; bench_size=128; workers=2; predict_count=24; else count=96; bench_count=480; bench_epochs=4; bench_size=512; workers=8; predict_count=512; fi
tiny=(--no-progress "device=$device" model.image_size=256 data.max_val_images=16 "data.num_workers=$workers" optim.warmup_iters=5)

step environment 60 "$py" -c "
import torch, torchvision, albumentations, pydicom, cv2
print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'albumentations', albumentations.__version__, 'cv2', cv2.__version__)
print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', 'bf16', torch.cuda.is_available() and torch.cuda.is_bf16_supported())
"
step synth 120 lungdet synth --out "$work/synth" --count "$count" --seed 1 --positive-fraction 0.5
step convert 120 lungdet convert --dicom-dir "$work/synth/stage_2_train_images" --labels "$work/synth/stage_2_train_labels.csv" --out "$work/coco" --image-size 256
data=$work/coco

if [[ $parts == *" tests "* ]]; then
    # The tests the CPU suite skips (they need CUDA): the fused update on GPU weights, device choice.
    step cuda_tests 120 "$py" -m pytest -q -p no:cacheprovider -rs tests/detection/test_train.py -k "cuda or gpu or device"
fi

if [[ $parts == *" smoke "* ]]; then
step train_bf16 180 lungdet train --config fasterrcnn_mobilenet_cpu --data "$data" --out "$work/bf16" "${tiny[@]}" optim.epochs=2 amp=bf16 channels_last=true checkpoint_every_steps=3
step resume_bf16 120 lungdet train --data "$data" --out "$work/bf16" --resume --no-progress optim.epochs=3
step train_fp16_maskrcnn 180 lungdet train --data "$data" --out "$work/mask" "${tiny[@]}" model.architecture=maskrcnn_resnet50_fpn optim.epochs=1 amp=fp16 data.batch_size=4
step train_bf16_retinanet 180 lungdet train --data "$data" --out "$work/retina" "${tiny[@]}" model.architecture=retinanet_resnet50_fpn optim.epochs=1 amp=bf16 data.batch_size=4
step predict 120 lungdet predict --checkpoint "$work/bf16/best.pt" --dicom-dir "$work/synth/stage_2_train_images" --out "$work/submission.csv" --device "$device" --no-progress
step score 60 lungdet score --submission "$work/submission.csv" --labels "$work/synth/stage_2_train_labels.csv"
# One GPU, two processes: NCCL refuses a shared GPU, so this must say so clearly ...
step ddp_nccl_refused 120 "$py" -m torch.distributed.run --standalone --nproc_per_node=2 -m lungdet train --config fasterrcnn_mobilenet_cpu --data "$data" --out "$work/ddp_nccl" "${tiny[@]}" optim.epochs=1
# ... and gloo lets both share it (a smoke test of DDP on CUDA tensors).
step ddp_gloo_shared_gpu 240 env LUNGDET_DIST_BACKEND=gloo "$py" -m torch.distributed.run --standalone --nproc_per_node=2 -m lungdet train --config fasterrcnn_mobilenet_cpu --data "$data" --out "$work/ddp" "${tiny[@]}" optim.epochs=2
for run in bf16 ddp; do
    [ -f "$work/$run/metrics.csv" ] && cp "$work/$run/metrics.csv" "$out/metrics_$run.csv"
done
fi

# The section 8 benchmark, realistic GPU model first (throughput), then the CPU demo's model at
# 512 px (it learns from scratch in a few epochs, so the mAP comparison means something).
bench_args=(--count "$bench_count" --epochs "$bench_epochs" --device "$device" "data.num_workers=$workers" "model.image_size=$bench_size")
if [[ $parts == *" bench "* ]]; then
    step bench_r50 300 "$py" -W ignore benchmarks/train_vs_reference.py --config fasterrcnn_resnet50_fpn "${bench_args[@]}"
    step bench_r50_reference_recipe 300 "$py" -W ignore benchmarks/train_vs_reference.py --config fasterrcnn_resnet50_fpn --recipe reference "${bench_args[@]}"
    step bench_mobilenet 300 "$py" -W ignore benchmarks/train_vs_reference.py --config fasterrcnn_mobilenet_cpu "${bench_args[@]}"
fi

if [[ $parts == *" ablation "* ]]; then
    # The benchmark's set (synthetic seed 0, half positive) and its warm-up (one epoch: batches - 1).
    step ablation_data 180 bash -c "lungdet synth --out '$work/bsynth' --count $bench_count --seed 0 --positive-fraction 0.5 \
        && lungdet convert --dicom-dir '$work/bsynth/stage_2_train_images' --labels '$work/bsynth/stage_2_train_labels.csv' --out '$work/bcoco' --image-size $bench_size"
    ours=(--config fasterrcnn_resnet50_fpn --data "$work/bcoco" --no-progress "device=$device" model.pretrained=none tensorboard=false
          "model.image_size=$bench_size" "optim.epochs=$bench_epochs" "optim.warmup_iters=$(( (bench_count * 4 / 5 + 7) / 8 - 1 ))" "data.num_workers=$workers")
    step ablation_as_is 240 lungdet train "${ours[@]}" --out "$work/a_as_is"
    step ablation_no_clip 240 lungdet train "${ours[@]}" --out "$work/a_no_clip" optim.grad_clip_norm=0
    step ablation_flip_only 240 lungdet train "${ours[@]}" --out "$work/a_flip_only" augment.shift_scale_rotate=0 augment.brightness_contrast=0
    step ablation_constant_lr 240 lungdet train "${ours[@]}" --out "$work/a_constant_lr" optim.schedule=step "optim.step_milestones=[1000]"
    grep "best val mAP" "$out"/ablation_*.log
fi

if [[ $parts == *" breakdown "* ]]; then
    # Where the step's time goes (benchmarks/step_breakdown.py), at 512 px for both configs and at
    # the RSNA's own 1024 px for ResNet-50, where the convolutions weigh four times more; and
    # ResNet-50 with torchvision's per-image heads, to measure what the batched ones save, and with
    # its backbone and RPN head compiled (compile=true).
    step breakdown_r50 120 "$py" -W ignore benchmarks/step_breakdown.py --config fasterrcnn_resnet50_fpn --device "$device" "model.image_size=$bench_size"
    step breakdown_r50_stock_heads 120 "$py" -W ignore benchmarks/step_breakdown.py --config fasterrcnn_resnet50_fpn --device "$device" "model.image_size=$bench_size" model.batched_heads=false
    step breakdown_mobilenet 120 "$py" -W ignore benchmarks/step_breakdown.py --config fasterrcnn_mobilenet_cpu --device "$device" "model.image_size=$bench_size"
    step breakdown_r50_1024 180 "$py" -W ignore benchmarks/step_breakdown.py --config fasterrcnn_resnet50_fpn --device "$device" "model.image_size=$(( bench_size * 2 ))"
    step breakdown_r50_compiled 300 "$py" -W ignore benchmarks/step_breakdown.py --config fasterrcnn_resnet50_fpn --device "$device" "model.image_size=$bench_size" compile=true
    # RoI pooling alone, torchvision's kernels against the sparse product the CPU uses: whether it
    # should run on the GPU too (detection/sparse_roi_align.py, SPARSE_DEVICE_TYPES).
    step roi_align_speed 120 "$py" -W ignore benchmarks/roi_align_speed.py --device "$device" --image-size "$bench_size"
fi

if [[ $parts == *" predict "* ]]; then
    # Inference from DICOM files (issue 15, part 3): decode, forward and end to end with the loader
    # workers side by side, in bf16, and onnxruntime's CUDA provider when onnxruntime-gpu is installed.
    for config in fasterrcnn_resnet50_fpn fasterrcnn_mobilenet_cpu; do
        step "predict_speed_$config" 300 "$py" -W ignore benchmarks/predict_speed.py --config "$config" --override "model.image_size=$bench_size" \
            --count "$predict_count" --batch-size 16 --workers "$workers" --device "$device" --json "$out/predict_speed_$config.json"
    done
fi

rm -rf "$work"
echo "=== summary"
cat "$summary"
