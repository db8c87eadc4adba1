// STAND-IN for the header that a CUDA build of PyTorch generates from
// c10/cuda/impl/cuda_cmake_macros.h.in; the CPU wheel does not ship it.
// Only tools/check_cuda.sh puts this directory on the include path (with -isystem, after
// torch's own -I directories, so a real copy always wins). Never use it for a real build.
#pragma once

#define C10_CUDA_BUILD_SHARED_LIBS

// The real file records the toolkit torch was built with; the compile check uses nvcc's.
#define TORCH_CUDA_VERSION_MAJOR __CUDACC_VER_MAJOR__
#define TORCH_CUDA_VERSION_MINOR __CUDACC_VER_MINOR__
#define TORCH_CUDA_VERSION_PATCH __CUDACC_VER_BUILD__
#define TORCH_CUDA_VERSION_BUILD 0
