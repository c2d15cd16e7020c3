// A declarations-only stand-in for Apple's metal-cpp, used on Linux to compile-check
// mlx_moe's Metal host code (mlx_moe/csrc/metal) against MLX's real Metal backend headers.
// It declares the types and the member functions those files use, with metal-cpp's
// signatures; nothing is defined and nothing links. The real build on macOS uses metal-cpp.
#pragma once
#include <cstddef>
#include <cstdint>

namespace NS {
using UInteger = unsigned long;
using Integer = long;
enum StringEncoding : UInteger { UTF8StringEncoding = 4 };
constexpr StringEncoding UTF8StringEncoding_ = UTF8StringEncoding;
class Object {};
class String : public Object {
 public:
  static String* string(const char*, StringEncoding);
  const char* utf8String() const;
};
class Error : public Object {
 public:
  String* localizedDescription() const;
};
class AutoreleasePool : public Object {
 public:
  static AutoreleasePool* alloc();
  AutoreleasePool* init();
  void release();
};
template <class T>
class SharedPtr {
 public:
  SharedPtr();
  ~SharedPtr();
  SharedPtr(const SharedPtr&);
  SharedPtr(SharedPtr&&);
  SharedPtr& operator=(const SharedPtr&);
  SharedPtr& operator=(SharedPtr&&);
  T* get() const;
  T* operator->() const;
  explicit operator bool() const;
};
template <class T>
SharedPtr<T> TransferPtr(T*);
template <class T>
SharedPtr<T> RetainPtr(T*);
}  // namespace NS

namespace MTL {
enum DataType : NS::UInteger { DataTypeUInt = 33, DataTypeBool = 53 };
enum BarrierScope : NS::UInteger { BarrierScopeBuffers = 1 };
struct Size {
  Size(NS::UInteger w, NS::UInteger h, NS::UInteger d);
  NS::UInteger width, height, depth;
};
class Resource : public NS::Object {};
class Allocation : public NS::Object {};
class Buffer : public Resource {
 public:
  void* contents();
  NS::UInteger length() const;
};
class Heap : public NS::Object {};
class Function : public NS::Object {};
class LinkedFunctions : public NS::Object {};
class Library : public NS::Object {};
class Fence : public NS::Object {};
class SharedEvent : public NS::Object {};
class ResidencySet : public NS::Object {};
class ResidencySets : public NS::Object {};
class Device : public NS::Object {};
class ComputePipelineState : public NS::Object {
 public:
  NS::UInteger maxTotalThreadsPerThreadgroup() const;
  NS::UInteger threadExecutionWidth() const;
};
class ComputeCommandEncoder : public NS::Object {
 public:
  void setComputePipelineState(const ComputePipelineState*);
  void setBuffer(const Buffer*, NS::UInteger offset, NS::UInteger index);
  void setBytes(const void*, NS::UInteger length, NS::UInteger index);
  void setThreadgroupMemoryLength(NS::UInteger length, NS::UInteger index);
  void dispatchThreadgroups(Size threadgroupsPerGrid, Size threadsPerThreadgroup);
  void dispatchThreadgroups(const Buffer* indirectBuffer, NS::UInteger indirectBufferOffset,
                            Size threadsPerThreadgroup);
  void dispatchThreads(Size threadsPerGrid, Size threadsPerThreadgroup);
  void memoryBarrier(BarrierScope);
};
class CommandBuffer : public NS::Object {};
class CommandQueue : public NS::Object {};
}  // namespace MTL
