# The four probe sweeps of benchmarks/results/ratio_probes_h100 (H100, 2026-11-24), as run on the device:
# probes in parallel (MPS from sweep 2 on: nvidia-cuda-mps-control -d), each `timeout 390-550`.
# Every probe's exact command is in probes.json ("command"); recall every 100 steps in its "history".
run() { name=$1; shift; python benchmarks/probe_recall.py --device cuda --width 64 "$@" > $name.log 2>&1 & }
# 1: 4 layers, ~2K tokens/step, 32 keys, heads x 16
for g in 1 2 4 0; do run L4h8g$g --keys 32 --steps 6000 --layers 4 --heads 8 --head-dim 16 --group-size $g; done
for h in 4 16; do for g in 4 0; do run L4h${h}g$g --keys 32 --steps 6000 --layers 4 --heads $h --head-dim 16 --group-size $g; done; done
# 2: 8 layers, ~2K tokens/step, lr and seeds
for g in 1 2 4 8 0; do run L8g$g --keys 32 --steps 9000 --layers 8 --group-size $g; done
for g in 2 4 8; do run L8g${g}lr1 --keys 32 --steps 9000 --layers 8 --group-size $g --lr 1e-3; done
# 3: 16K tokens per step
for g in 1 2 4 8 0; do run L8g${g}t16 --keys 32 --steps 9000 --layers 8 --group-size $g --tokens 16384; done
for g in 1 2 4 0; do run L4g${g}t16 --keys 32 --steps 9000 --layers 4 --group-size $g --tokens 16384; done
# 4: 64 / 128 keys, 2 heads x 16
for g in 1 2 4 0; do run L4k64hd16g$g --steps 9000 --tokens 16384 --heads 2 --layers 4 --keys 64 --head-dim 16 --pairs 16,32,64 --group-size $g; done
for g in 4 8 0; do run L8k64hd16g$g --steps 9000 --tokens 16384 --heads 2 --layers 8 --keys 64 --head-dim 16 --pairs 16,32,64 --group-size $g; done
wait
