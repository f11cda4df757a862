// Error messages built without iostreams. TORCH_CHECK formats a message of several arguments by streaming each
// into a std::ostringstream (c10::str); on an H100 machine (torch 2.11.0+cu130, Python 3.12, the extension built
// there) every check of ours whose message formatted a number crashed the process with a segmentation fault, and
// every one that formatted only text raised as it should (the cause there is not known; a build of the same code
// elsewhere raises both). A message built here is one string, its numbers formatted by std::to_string and
// snprintf the way a stream prints them, and passed as a C string: TORCH_CHECK takes a single C string as the
// message itself, with no stream in our library (a std::string would still go through one in c10::str; c10::Error
// assembles its final text with a stream inside libc10, for every torch error).
//
//   TORCH_CHECK_VALUE(x.dim() == 2, message("op: x must be 2-D, got shape ", x.sizes()).c_str());
//
// The temporary string lives to the end of the throw expression, which copies it into the error.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/Layout.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>

namespace unlearn_kernels {
namespace detail {

inline void append(std::string& out, const char* text) { out += text; }
inline void append(std::string& out, const std::string& text) { out += text; }
inline void append(std::string& out, char c) { out += c; }

template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, char>, int> = 0>
void append(std::string& out, T value) {
  // a stream prints these as characters: cast such a value to int (a number) or pass a char (a character)
  static_assert(!std::is_same_v<T, signed char> && !std::is_same_v<T, unsigned char>,
                "message(): int8_t / uint8_t would print as a number here but as a character in a stream");
  out += std::to_string(value);  // bool as 1 or 0, as a stream prints it
}

// a stream's default for floating values: 6 significant digits, %g
inline void append(std::string& out, double value) {
  char text[32];
  std::snprintf(text, sizeof text, "%g", value);
  out += text;
}

inline void append(std::string& out, c10::IntArrayRef values) {  // [2, 5], as c10 prints an ArrayRef
  out += '[';
  for (size_t i = 0; i < values.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(values[i]);
  }
  out += ']';
}

inline void append(std::string& out, c10::ScalarType type) { out += c10::toString(type); }
inline void append(std::string& out, const c10::Device& device) { out += device.str(); }

inline void append(std::string& out, c10::Layout layout) {
  switch (layout) {
    case c10::kStrided: out += "Strided"; return;
    case c10::kSparse: out += "Sparse"; return;
    case c10::kSparseCsr: out += "SparseCsr"; return;
    case c10::kSparseCsc: out += "SparseCsc"; return;
    case c10::kSparseBsr: out += "SparseBsr"; return;
    case c10::kSparseBsc: out += "SparseBsc"; return;
    case c10::kMkldnn: out += "Mkldnn"; return;
    case c10::kJagged: out += "Jagged"; return;
    default: out += "Layout " + std::to_string(static_cast<int>(layout));
  }
}

}  // namespace detail

// The arguments' texts joined, as TORCH_CHECK's own formatting would join them.
template <typename... Args>
std::string message(const Args&... args) {
  std::string out;
  (detail::append(out, args), ...);
  return out;
}

}  // namespace unlearn_kernels
