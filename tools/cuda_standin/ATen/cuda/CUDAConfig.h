// STAND-IN for the header that a CUDA build of PyTorch generates from
// aten/src/ATen/cuda/CUDAConfig.h.in; the CPU wheel does not ship it.
// Only tools/check_cuda.sh puts this directory on the include path (with -isystem, after
// torch's own -I directories, so a real copy always wins). Never use it for a real build.
#pragma once

// None of the localgp kernels includes this file today; the values only have to be defined.
#define AT_CUDNN_ENABLED() 1
#define AT_CUSPARSELT_ENABLED() 0
#define AT_HIPSPARSELT_ENABLED() 0
#define AT_ROCM_ENABLED() 0
#define AT_MAGMA_ENABLED() 0

#define NVCC_FLAGS_EXTRA ""
