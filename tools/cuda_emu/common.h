// Shared by the test programs. Each includes one rewritten csrc/cuda/*.cu (its ops live in an
// anonymous namespace, so they are only reachable from the same translation unit) and calls
// the CUDA ops directly on CPU tensors; nothing is registered with the dispatcher.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, key, m) [[maybe_unused]] static void unused_impl(torch::Library& m)

#include <iostream>
#include <random>
#include <sstream>
#include <string>

inline int passed = 0, failed = 0;

// One comparison with a reference; on failure prints the line and what was compared.
#define EXPECT(cond, ...)                                                          \
  do {                                                                             \
    if (cond) {                                                                    \
      ++passed;                                                                    \
    } else {                                                                       \
      ++failed;                                                                    \
      std::cerr << __FILE__ << ":" << __LINE__ << ": FAILED " #cond ": "           \
                << __VA_ARGS__ << "\n";                                            \
    }                                                                              \
  } while (0)

// The statement f must throw an error whose message contains `expected`.
#define EXPECT_ERROR(f, expected)                                                  \
  do {                                                                             \
    const std::string message_ = error_of([&] { f; });                             \
    EXPECT(message_.find(expected) != std::string::npos,                           \
           "expected an error with \"" << (expected) << "\", got \"" << message_ << "\""); \
  } while (0)

template <class F> std::string error_of(F f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  } catch (const std::exception& e) {  // emu's device asserts
    return e.what();
  }
  return "(no error)";
}

template <class T> std::string str(const T& v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

// Runs the tests; an exception that escapes them counts as one more failure.
template <class F> int run_tests(const char* name, F tests) {
  try {
    tests();
  } catch (const std::exception& e) {
    ++failed;
    std::cerr << name << ": uncaught exception: " << e.what() << "\n";
  }
  std::cout << name << ": " << passed << " passed, " << failed << " failed\n";
  return failed != 0;
}
