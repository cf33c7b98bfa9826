# Sourced by the scripts whose numbers are published (the main job): the same bits on every x86-64
# machine with AVX2, whatever wider instructions it has. Without it the main job's table depends on
# the CPU it lands on: AVX512 kernels add in another order than AVX2 ones, and 750 training steps of
# a tiny model turn last-bit differences into other answers (an AMD EPYC printed MoSLoRA's MME 18.5
# where an Intel Xeon with AMX printed 24.3; docs/evaluation.md#one-table-on-every-machine).
# Each variable must be set before torch is imported, so the scripts export them for every process.
export ATEN_CPU_CAPABILITY=avx2  # ATen's vectorised kernels (softmax, norms, GELU, AdamW, sums): 8 lanes
export ONEDNN_MAX_CPU_ISA=AVX2   # oneDNN (the ViT's patch convolution): no AVX512 or AMX kernels
export MKL_CBWR=AVX2,STRICT      # MKL's matmuls: its AVX2 branch on Intel and AMD alike
