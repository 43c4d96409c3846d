// lory: a read-only memory map of a raw file, for kNN graphs too large to load (a 100M-doc graph
// with k = 10 is 12 GB): batching::KnnGraphView points into the mapping, and the walk touches only
// the rows it reads. POSIX only (mmap); elsewhere MappedFile::open returns kErrorInvalidArgument.
//
// Files are raw arrays in the machine's byte order (little-endian on every platform lory targets):
// ids as int64 or int32 [N, k], sims as float32 [N, k], e.g. numpy's ndarray.tofile.
#pragma once
#include <cstddef>
#include <cstdint>

#include "lory/config.hpp"
#include "lory/status.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#define LORY_HAS_MMAP 1
#else
#define LORY_HAS_MMAP 0
#endif

LORY_NAMESPACE_BEGIN
namespace batching {

class MappedFile {
 public:
  MappedFile() = default;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  MappedFile(MappedFile&& o) noexcept : data_(o.data_), size_(o.size_) { o.data_ = nullptr, o.size_ = 0; }
  MappedFile& operator=(MappedFile&& o) noexcept {
    if (this != &o) {
      close();
      data_ = o.data_, size_ = o.size_;
      o.data_ = nullptr, o.size_ = 0;
    }
    return *this;
  }
  ~MappedFile() { close(); }

  // Maps the whole file read-only. kErrorNullPointer for a null path, kErrorInvalidArgument when the
  // file cannot be opened or mapped (or on a platform without mmap), kErrorInvalidSize when empty.
  Status open(const char* path) {
    close();
    if (!path) return Status::kErrorNullPointer;
#if LORY_HAS_MMAP
    const int fd = ::open(path, O_RDONLY);
    if (fd < 0) return Status::kErrorInvalidArgument;
    struct stat st;
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      return Status::kErrorInvalidArgument;
    }
    if (st.st_size <= 0) {
      ::close(fd);
      return Status::kErrorInvalidSize;
    }
    void* p = ::mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_SHARED, fd, 0);
    ::close(fd);  // the mapping keeps the file alive
    if (p == MAP_FAILED) return Status::kErrorInvalidArgument;
    data_ = p;
    size_ = static_cast<size_t>(st.st_size);
    return Status::kSuccess;
#else
    return Status::kErrorInvalidArgument;
#endif
  }

  void close() {
#if LORY_HAS_MMAP
    if (data_) ::munmap(data_, size_);
#endif
    data_ = nullptr;
    size_ = 0;
  }

  // The mapping as an array of T, or null when it is not a whole number of T.
  template <class T> const T* as() const {
    return (data_ && size_ % sizeof(T) == 0) ? static_cast<const T*>(data_) : nullptr;
  }
  template <class T> int64_t count() const { return static_cast<int64_t>(size_ / sizeof(T)); }
  size_t size_bytes() const { return size_; }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace batching
LORY_NAMESPACE_END
