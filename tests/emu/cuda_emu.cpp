// The CPU emulator's scheduler (one fiber per CUDA thread) and the subset of
// the CUDA runtime API the tests and launchers call, over host memory.
// See cuda_emu.hpp for what is modelled and what is not.
#include "emu/cuda_emu.hpp"


#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <string>
#include <vector>

namespace lory_emu {
namespace {

// The emulated device: sm_80 (A100), sm_90 (H100/H200: wgmma, more shared memory) when
// LORY_EMU_ARCH=sm90, or sm_86 (99 KiB of shared memory per block) when LORY_EMU_ARCH=sm86; its per-block and per-SM limits, few SMs (persistent grids then loop over
// many tiles per block, as on a big GPU with big shapes).
constexpr int kMaxThreadsPerBlock = 1024;
constexpr int kMaxThreadsPerSm = 2048;
constexpr int kMaxBlocksPerSm = 32;
constexpr size_t kDefaultSmem = 48 * 1024;
constexpr size_t kSmemReservedPerBlock = 1024;
struct Arch {
  int major, minor;
  size_t max_smem_optin;  // per block
  size_t smem_per_sm;
};
const Arch& arch() {
  static const Arch a = [] {
    const char* s = std::getenv("LORY_EMU_ARCH");
    if (!s || std::string(s) == "sm80") return Arch{8, 0, 166912, 167936};  // 163 KiB, 164 KiB
    if (std::string(s) == "sm90") return Arch{9, 0, 232448, 233472};        // 227 KiB, 228 KiB
    if (std::string(s) == "sm86") return Arch{8, 6, 101376, 102400};        // 99 KiB, 100 KiB (sm_89, sm_120 alike)
    std::fprintf(stderr, "lory CUDA emulator: LORY_EMU_ARCH=%s is not sm80, sm86 or sm90\n", s);
    std::abort();
  }();
  return a;
}
constexpr size_t kStackBytes = 256 * 1024;  // per fiber

int emulated_sms() {
  static const int n = [] {
    const char* s = std::getenv("LORY_EMU_SMS");
    const int v = s ? std::atoi(s) : 2;
    return v > 0 ? v : 2;
  }();
  return n;
}
bool reverse_order() {
  static const bool r = [] {
    const char* s = std::getenv("LORY_EMU_ORDER");
    return s && std::string(s) == "reverse";
  }();
  return r;
}

enum class Wait { kNone, kBlock, kWarp, kGroup };

// ---- fiber contexts --------------------------------------------------------
// x86-64: a switch that saves the callee-saved registers, MXCSR and the x87
// control word on the stack and swaps stack pointers (no system call, unlike
// swapcontext, which also saves the signal mask). Elsewhere: ucontext.
#if defined(__x86_64__) && !defined(LORY_EMU_UCONTEXT)
}  // namespace
}  // namespace lory_emu
extern "C" void lory_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .globl lory_emu_switch
  .type lory_emu_switch, @function
lory_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size lory_emu_switch, .-lory_emu_switch
)");
namespace lory_emu {
namespace {

struct FiberCtx {
  void* sp = nullptr;
};
void ctx_switch(FiberCtx& from, FiberCtx& to) { lory_emu_switch(&from.sp, to.sp); }
// A context that starts entry() (which must never return) on the given stack.
void ctx_init(FiberCtx& c, char* stack, size_t bytes, void (*entry)()) {
  void** sp = reinterpret_cast<void**>((reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15));
  *--sp = nullptr;                           // entry's return address slot: entry sees rsp = 8 mod 16
  *--sp = reinterpret_cast<void*>(entry);    // where the first switch's ret goes
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
  --sp;                                      // MXCSR and x87 control word: the current ones
  uint32_t mxcsr = 0;
  uint16_t cw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(cw));
  std::memcpy(sp, &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(sp) + 4, &cw, 2);
  c.sp = sp;
}
#else
}  // namespace
}  // namespace lory_emu
#include <ucontext.h>
namespace lory_emu {
namespace {

struct FiberCtx {
  ucontext_t uc;
};
void ctx_switch(FiberCtx& from, FiberCtx& to) { swapcontext(&from.uc, &to.uc); }
void ctx_init(FiberCtx& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes, src_bytes;
};

struct PendingWgmma {
  float* d;
  std::vector<float> value;
};

struct Fiber {
  std::vector<AsyncCopy> copies;   // cp.async queue, oldest first
  std::vector<size_t> group_ends;  // end index in `copies` of each committed group, oldest first
  std::vector<PendingWgmma> wgmma;        // issued wgmma results not yet written, oldest first
  std::vector<size_t> wgmma_group_ends;   // end index in `wgmma` of each committed group
  FiberCtx ctx;
  char* stack = nullptr;
  uint3 tid;
  int warp = 0;
  bool done = false;
  Wait wait = Wait::kNone;
  uint64_t gen = 0;
  const void* xin = nullptr;
  void* xout = nullptr;
  Combine xfn = nullptr;
};

struct Block {
  std::vector<Fiber> fibers;
  int live = 0, arrived = 0;
  uint64_t gen = 0;
  std::vector<int> wsize, wlive, warrived;
  std::vector<uint64_t> wgen;
  std::vector<int> gsize, glive, garrived;  // per warpgroup (4 warps)
  std::vector<uint64_t> ggen;
  std::vector<unsigned char> smem;
  std::map<const void*, std::vector<unsigned char>> statics;  // LORY_BLOCK_SHARED variables
  uint3 bid;
  dim3 bdim, gdim;
  FiberCtx sched;
  int cur = -1;
  const std::function<void()>* body = nullptr;
};

Block* g_block = nullptr;
cudaError_t g_last_error = cudaSuccess;
std::map<const void*, int> g_max_dyn_smem;  // per kernel, cudaFuncAttributeMaxDynamicSharedMemorySize
int g_kernel_ptx_version = 0;               // set_kernel_ptx_version; 0: the arch's
std::vector<const void*> g_launch_log;      // take_launch_log

Block& block() {
  if (!g_block) fail("a device built-in was used outside a kernel");
  return *g_block;
}
Fiber& me() { return block().fibers[block().cur]; }

void park(Wait w, uint64_t gen) {
  Block& b = block();
  Fiber& f = b.fibers[b.cur];
  f.wait = w;
  f.gen = gen;
  ctx_switch(f.ctx, b.sched);
}

// A group of `width` consecutive threads (a warp: 32, a warpgroup: 128) with its own arrival count
// and generation: runs the group's collective once every live thread of it has arrived.
struct ThreadGroup {
  int width;
  std::vector<int>& size;
  std::vector<int>& live;
  std::vector<int>& arrived;
  std::vector<uint64_t>& gen;
  const char* mixed;  // failure messages
  const char* partial;
};

void release_if_complete(Block& b, const ThreadGroup& t, int i) {
  if (t.arrived[i] == 0 || t.arrived[i] != t.live[i]) return;
  const int first = i * t.width;
  Combine fn = nullptr;
  bool seen = false;
  for (int l = 0; l < t.size[i]; ++l) {
    const Fiber& f = b.fibers[first + l];
    if (f.done) continue;
    if (seen && f.xfn != fn) fail(t.mixed);
    fn = f.xfn;
    seen = true;
  }
  if (fn) {
    if (t.live[i] != t.width) fail(t.partial);
    std::vector<const void*> ins(static_cast<size_t>(t.width));
    std::vector<void*> outs(static_cast<size_t>(t.width));
    for (int l = 0; l < t.width; ++l) {
      ins[static_cast<size_t>(l)] = b.fibers[first + l].xin;
      outs[static_cast<size_t>(l)] = b.fibers[first + l].xout;
    }
    fn(ins.data(), outs.data());
  }
  for (int l = 0; l < t.size[i]; ++l) b.fibers[first + l].xfn = nullptr;
  t.arrived[i] = 0;
  ++t.gen[i];
}

ThreadGroup warps_of(Block& b) {
  return {32, b.wsize, b.wlive, b.warrived, b.wgen, "the lanes of a warp met at different collectives (or __syncwarp)",
          "a warp collective (ldmatrix, mma, shuffle) ran with fewer than 32 live lanes"};
}
ThreadGroup warpgroups_of(Block& b) {
  return {128, b.gsize, b.glive, b.garrived, b.ggen, "the threads of a warpgroup met at different collectives",
          "a warpgroup collective (wgmma) ran with fewer than 128 live threads"};
}
void release_warp_if_complete(Block& b, int w) { release_if_complete(b, warps_of(b), w); }
void release_group_if_complete(Block& b, int wg) { release_if_complete(b, warpgroups_of(b), wg); }

void release_block_if_complete(Block& b) {
  if (b.arrived == 0 || b.arrived != b.live) return;
  b.arrived = 0;
  ++b.gen;
}

// Performs the first n queued copies of f.
void perform_copies(Fiber& f, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const AsyncCopy& c = f.copies[i];
    std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_bytes));
    std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, static_cast<size_t>(c.bytes - c.src_bytes));
  }
  f.copies.erase(f.copies.begin(), f.copies.begin() + static_cast<std::ptrdiff_t>(n));
}

// The commit groups of a per-thread queue (cp.async copies, wgmma results): how many queued items
// wait_group(n) completes -- those of every committed group but the newest n -- with those groups
// removed and the ends of the others shifted down by as many.
size_t retire_groups(std::vector<size_t>& group_ends, int n, const char* negative) {
  if (n < 0) fail(negative);
  if (group_ends.size() <= static_cast<size_t>(n)) return 0;
  const size_t done = group_ends.size() - static_cast<size_t>(n);
  const size_t upto = group_ends[done - 1];
  group_ends.erase(group_ends.begin(), group_ends.begin() + static_cast<std::ptrdiff_t>(done));
  for (size_t& e : group_ends) e -= upto;
  return upto;
}

[[noreturn]] void fiber_entry() {
  Block& b = *g_block;
  (*b.body)();
  Fiber& f = b.fibers[b.cur];
  perform_copies(f, f.copies.size());  // a thread's copies complete even if it never waited
  f.group_ends.clear();
  f.done = true;
  --b.live;
  --b.wlive[f.warp];
  --b.glive[f.warp / 4];
  // A thread that exits no longer counts at a barrier (as on hardware).
  release_block_if_complete(b);
  release_warp_if_complete(b, f.warp);
  release_group_if_complete(b, f.warp / 4);
  ctx_switch(f.ctx, b.sched);  // never resumed
  fail("a finished fiber was resumed");
}

bool runnable(const Block& b, const Fiber& f) {
  if (f.done) return false;
  switch (f.wait) {
    case Wait::kNone: return true;
    case Wait::kBlock: return b.gen != f.gen;
    case Wait::kWarp: return b.wgen[f.warp] != f.gen;
    case Wait::kGroup: return b.ggen[f.warp / 4] != f.gen;
  }
  return false;
}

struct StackPool {
  std::vector<char*> stacks;
  char* get(size_t i) {
    while (stacks.size() <= i) stacks.push_back(static_cast<char*>(std::malloc(kStackBytes)));
    return stacks[i];
  }
  ~StackPool() {
    for (char* s : stacks) std::free(s);
  }
};

void run_block(Block& b, StackPool& pool) {
  const int n = static_cast<int>(b.bdim.x * b.bdim.y * b.bdim.z);
  const int warps = (n + 31) / 32;
  b.fibers.assign(n, Fiber{});
  b.live = n;
  b.arrived = 0;
  b.gen = 0;
  b.wsize.assign(warps, 0);
  b.wlive.assign(warps, 0);
  b.warrived.assign(warps, 0);
  b.wgen.assign(warps, 0);
  const int groups = (warps + 3) / 4;
  b.gsize.assign(groups, 0);
  b.glive.assign(groups, 0);
  b.garrived.assign(groups, 0);
  b.ggen.assign(groups, 0);
  std::fill(b.smem.begin(), b.smem.end(), static_cast<unsigned char>(0xff));  // NaN in every float type
  b.statics.clear();
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.tid = make_uint3(i % b.bdim.x, (i / b.bdim.x) % b.bdim.y, i / (b.bdim.x * b.bdim.y));
    f.warp = i / 32;
    ++b.wsize[f.warp];
    ++b.wlive[f.warp];
    ++b.gsize[f.warp / 4];
    ++b.glive[f.warp / 4];
    f.stack = pool.get(i);
    ctx_init(f.ctx, f.stack, kStackBytes, fiber_entry);
  }
  int finished = 0;
  while (finished < n) {
    bool progress = false;
    finished = 0;
    for (int k = 0; k < n; ++k) {
      const int i = reverse_order() ? n - 1 - k : k;
      Fiber& f = b.fibers[i];
      if (f.done) {
        ++finished;
        continue;
      }
      if (!runnable(b, f)) continue;
      f.wait = Wait::kNone;
      b.cur = i;
      ctx_switch(b.sched, f.ctx);
      progress = true;
      if (f.done) ++finished;
    }
    if (!progress && finished < n) fail("deadlock: threads wait at a barrier that the others never reach");
  }
  b.cur = -1;
}

}  // namespace

const uint3& thread_idx() { return me().tid; }
const uint3& block_idx() { return block().bid; }
const dim3& block_dim() { return block().bdim; }
const dim3& grid_dim() { return block().gdim; }
unsigned char* dynamic_smem() { return block().smem.empty() ? nullptr : block().smem.data(); }

void cp_async(void* smem_dst, const void* src, int bytes, int src_bytes) {
  if (bytes != 4 && bytes != 8 && bytes != 16) fail("cp.async copies 4, 8 or 16 bytes");
  if (src_bytes < 0 || src_bytes > bytes) fail("cp.async src-size outside [0, cp-size]");
  check_smem(smem_dst, static_cast<size_t>(bytes), "cp.async destination");
  if (reinterpret_cast<uintptr_t>(smem_dst) % bytes != 0 || (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % bytes != 0))
    fail("cp.async address not aligned to its size");
  me().copies.push_back(AsyncCopy{smem_dst, src, bytes, src_bytes});
}

void cp_async_commit() {
  Fiber& f = me();
  f.group_ends.push_back(f.copies.size());
}

void cp_async_wait(int n) {
  Fiber& f = me();
  perform_copies(f, retire_groups(f.group_ends, n, "cp.async.wait_group with a negative count"));
}

void syncthreads() {
  Block& b = block();
  ++b.arrived;
  const uint64_t gen = b.gen;
  release_block_if_complete(b);
  if (b.gen == gen) park(Wait::kBlock, gen);
}

void* block_shared_bytes(const void* key, size_t bytes) {
  auto& v = block().statics[key];
  if (v.empty()) v.assign(bytes, 0xff);  // poisoned, like dynamic shared memory
  if (v.size() != bytes) fail("one LORY_BLOCK_SHARED key with two sizes");
  return v.data();
}

void syncwarp() { warp_collective(nullptr, nullptr, nullptr); }

void warp_collective(const void* in, void* out, Combine combine) {
  Block& b = block();
  Fiber& f = b.fibers[b.cur];
  f.xin = in;
  f.xout = out;
  f.xfn = combine;
  ++b.warrived[f.warp];
  const uint64_t gen = b.wgen[f.warp];
  release_warp_if_complete(b, f.warp);
  if (b.wgen[f.warp] == gen) park(Wait::kWarp, gen);
}

void warpgroup_collective(const void* in, void* out, Combine combine) {
  Block& b = block();
  Fiber& f = b.fibers[b.cur];
  const int wg = f.warp / 4;
  f.xin = in;
  f.xout = out;
  f.xfn = combine;
  ++b.garrived[wg];
  const uint64_t gen = b.ggen[wg];
  release_group_if_complete(b, wg);
  if (b.ggen[wg] == gen) park(Wait::kGroup, gen);
}

uint32_t smem_offset(const void* p) {
  const Block& b = block();
  const unsigned char* q = static_cast<const unsigned char*>(p);
  if (b.smem.empty() || q < b.smem.data() || q >= b.smem.data() + b.smem.size())
    fail("a shared-memory address outside the block's dynamic shared memory");
  return static_cast<uint32_t>(q - b.smem.data());
}

namespace {
struct WgmmaIn {
  uint64_t desc_a, desc_b;
  uint32_t a[4];
  bool a_regs, bf16, accumulate;
  int n;
  float c[64];
};
struct WgmmaOut {
  float d[64];
};

// Element (r, k) of a K-major operand without swizzling (lory/detail/wgmma.cuh, PTX ISA "Shared
// Memory Matrix Layout"): start + (r / 8) SBO + (k / 8) LBO + (r % 8) 16 + (k % 8) 2 bytes.
float wgmma_smem_element(uint64_t desc, int r, int k, bool bf16) {
  if ((desc >> 62) != 0) fail("wgmma: only the no-swizzle layout is emulated");
  if (((desc >> 49) & 7) != 0) fail("wgmma: a nonzero matrix base offset is not emulated");
  const size_t start = size_t(desc & 0x3fff) << 4, lbo = size_t((desc >> 16) & 0x3fff) << 4,
               sbo = size_t((desc >> 32) & 0x3fff) << 4;
  const size_t off = start + size_t(r / 8) * sbo + size_t(k / 8) * lbo + size_t(r % 8) * 16 + size_t(k % 8) * 2;
  const unsigned char* p = dynamic_smem() + off;
  check_smem(p, 2, "wgmma operand element");
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return b16_to_float(bits, bf16);
}

void wgmma_combine(const void* const* ins, void* const* outs) {
  const WgmmaIn& x0 = *static_cast<const WgmmaIn*>(ins[0]);
  const int n = x0.n;
  for (int l = 1; l < 128; ++l) {
    const WgmmaIn& x = *static_cast<const WgmmaIn*>(ins[l]);
    if (x.desc_a != x0.desc_a || x.desc_b != x0.desc_b || x.a_regs != x0.a_regs || x.bf16 != x0.bf16 ||
        x.accumulate != x0.accumulate || x.n != n)
      fail("wgmma: the threads of a warpgroup issued different instructions or descriptors");
  }
  float A[64][16];
  std::vector<float> B(size_t(n) * 16);
  for (int r = 0; r < 64; ++r)
    for (int k = 0; k < 16; ++k) A[r][k] = x0.a_regs ? 0.f : wgmma_smem_element(x0.desc_a, r, k, x0.bf16);
  if (x0.a_regs) {
    // Warp w holds rows 16w..16w+15 as mma.sync m16n8k16's A fragment.
    for (int l = 0; l < 128; ++l) {
      const WgmmaIn& x = *static_cast<const WgmmaIn*>(ins[l]);
      const int w = l / 32, g = (l % 32) / 4, t = l % 4;
      for (int h = 0; h < 2; ++h)
        for (int v = 0; v < 2; ++v) {
          const uint32_t reg = x.a[2 * h + v];
          A[16 * w + g + 8 * v][2 * t + 8 * h] = b16_to_float(static_cast<uint16_t>(reg & 0xffffu), x0.bf16);
          A[16 * w + g + 8 * v][2 * t + 8 * h + 1] = b16_to_float(static_cast<uint16_t>(reg >> 16), x0.bf16);
        }
    }
  }
  for (int c = 0; c < n; ++c)
    for (int k = 0; k < 16; ++k) B[size_t(c) * 16 + k] = wgmma_smem_element(x0.desc_b, c, k, x0.bf16);
  for (int l = 0; l < 128; ++l) {
    const WgmmaIn& x = *static_cast<const WgmmaIn*>(ins[l]);
    WgmmaOut& o = *static_cast<WgmmaOut*>(outs[l]);
    const int w = l / 32, g = (l % 32) / 4, t = l % 4;
    for (int j = 0; j < n / 8; ++j)
      for (int i = 0; i < 4; ++i) {
        const int row = 16 * w + g + 8 * (i / 2), col = 8 * j + 2 * t + i % 2;
        double sum = 0.0;
        for (int k = 0; k < 16; ++k) sum += double(A[row][k]) * double(B[size_t(col) * 16 + k]);
        o.d[4 * j + i] = (x.accumulate ? x.c[4 * j + i] : 0.f) + static_cast<float>(sum);
      }
  }
}
}  // namespace

void wgmma_issue(float* d, int n, bool bf16, uint64_t desc_a, const uint32_t* a_regs, uint64_t desc_b, bool accumulate) {
  if (arch().major != 9) fail("wgmma on an emulated sm_80 device (LORY_EMU_ARCH=sm90 emulates an H100)");
  if (n < 8 || n > 128 || n % 8 != 0) fail("wgmma: N outside the emulated 8..128");
  Fiber& f = me();
  WgmmaIn in{};
  in.desc_a = desc_a;
  in.desc_b = desc_b;
  in.a_regs = a_regs != nullptr;
  if (a_regs) std::memcpy(in.a, a_regs, sizeof(in.a));
  in.bf16 = bf16;
  in.accumulate = accumulate;
  in.n = n;
  // The accumulator's current value: a pending result of an earlier issue into the same d, else d.
  const PendingWgmma* prior = nullptr;
  for (const PendingWgmma& p : f.wgmma)
    if (p.d == d) prior = &p;
  for (int i = 0; i < n / 2; ++i) in.c[i] = prior ? prior->value[size_t(i)] : d[i];
  WgmmaOut out{};
  warpgroup_collective(&in, &out, &wgmma_combine);
  Fiber& g = me();  // (the same fiber; re-read after the switch)
  g.wgmma.push_back(PendingWgmma{d, std::vector<float>(out.d, out.d + n / 2)});
  for (int i = 0; i < n / 2; ++i) d[i] = std::numeric_limits<float>::quiet_NaN();
}

void wgmma_commit() {
  Fiber& f = me();
  f.wgmma_group_ends.push_back(f.wgmma.size());
}

void wgmma_wait(int n) {
  Fiber& f = me();
  const size_t upto = retire_groups(f.wgmma_group_ends, n, "wgmma.wait_group with a negative count");
  for (size_t i = 0; i < upto; ++i) std::memcpy(f.wgmma[i].d, f.wgmma[i].value.data(), f.wgmma[i].value.size() * sizeof(float));
  f.wgmma.erase(f.wgmma.begin(), f.wgmma.begin() + static_cast<std::ptrdiff_t>(upto));
}

void set_kernel_ptx_version(int version) { g_kernel_ptx_version = version; }

std::vector<const void*> take_launch_log() {
  std::vector<const void*> log;
  log.swap(g_launch_log);
  return log;
}

void fail(const char* what) {
  std::fprintf(stderr, "lory CUDA emulator: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

void check_smem(const void* p, size_t bytes, const char* what) {
  const Block& b = block();
  const unsigned char* q = static_cast<const unsigned char*>(p);
  if (b.smem.empty() || q < b.smem.data() || q + bytes > b.smem.data() + b.smem.size()) {
    std::fprintf(stderr, "lory CUDA emulator: %s at %p is outside the block's %zu bytes of shared memory\n", what, p,
                 b.smem.size());
    fail("shared-memory access out of bounds");
  }
}

void run_grid(const void* func, dim3 grid, dim3 block_dim3, size_t smem, const std::function<void()>& body) {
  if (g_block) fail("a kernel launched another kernel");
  g_launch_log.push_back(func);
  const uint64_t threads = uint64_t(block_dim3.x) * block_dim3.y * block_dim3.z;
  const auto it = g_max_dyn_smem.find(func);
  const size_t smem_limit = it == g_max_dyn_smem.end() ? kDefaultSmem : size_t(it->second);
  if (threads == 0 || threads > kMaxThreadsPerBlock || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535) {
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (smem > smem_limit) {
    g_last_error = cudaErrorInvalidValue;  // what the runtime reports for too much dynamic shared memory
    return;
  }
  static StackPool pool;
  Block b;
  b.smem.assign(smem, 0);
  b.bdim = block_dim3;
  b.gdim = grid;
  b.body = &body;
  g_block = &b;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        b.bid = make_uint3(x, y, z);
        run_block(b, pool);
      }
  g_block = nullptr;
}

}  // namespace lory_emu

// ---------------------------------------------------------------------------
// The CUDA runtime API over host memory (only what the tests and launchers use).
// ---------------------------------------------------------------------------
using lory_emu::g_last_error;

extern "C" {

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int) { return cudaSuccess; }

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = lory_emu::emulated_sms(); return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = lory_emu::arch().major; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = lory_emu::arch().minor; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = int(lory_emu::arch().max_smem_optin); return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = int(lory_emu::kDefaultSmem); return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = int(lory_emu::arch().smem_per_sm); return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = lory_emu::kMaxThreadsPerBlock; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || size_t(value) > lory_emu::arch().max_smem_optin) return g_last_error = cudaErrorInvalidValue;
  lory_emu::g_max_dyn_smem[func] = value;
  return cudaSuccess;
}

// Kernels built by the host compiler have every feature (wgmma included) and no static shared
// memory the runtime would know of.
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void* func) {
  *attr = cudaFuncAttributes{};
  attr->maxThreadsPerBlock = lory_emu::kMaxThreadsPerBlock;
  const auto it = lory_emu::g_max_dyn_smem.find(func);
  attr->maxDynamicSharedSizeBytes = it == lory_emu::g_max_dyn_smem.end() ? int(lory_emu::kDefaultSmem) : it->second;
  attr->binaryVersion = 10 * lory_emu::arch().major + lory_emu::arch().minor;
  attr->ptxVersion = lory_emu::g_kernel_ptx_version ? lory_emu::g_kernel_ptx_version : attr->binaryVersion;
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, const void* func, int block_size,
                                                          size_t dynamic_smem) {
  if (block_size <= 0 || block_size > lory_emu::kMaxThreadsPerBlock) return cudaErrorInvalidValue;
  const auto it = lory_emu::g_max_dyn_smem.find(func);
  const size_t limit = it == lory_emu::g_max_dyn_smem.end() ? lory_emu::kDefaultSmem : size_t(it->second);
  if (dynamic_smem > limit) {
    *n = 0;
    return cudaSuccess;
  }
  const int by_threads = lory_emu::kMaxThreadsPerSm / block_size;
  const int by_smem = int(lory_emu::arch().smem_per_sm / (dynamic_smem + lory_emu::kSmemReservedPerBlock));
  *n = std::max(0, std::min({by_threads, by_smem, lory_emu::kMaxBlocksPerSm}));
  return cudaSuccess;
}

// Fresh device memory is poisoned (all bits set: NaN in every float type), so a
// kernel that reads memory nobody wrote fails the same way every run.
cudaError_t cudaMalloc(void** p, size_t bytes) {
  *p = std::malloc(bytes ? bytes : 1);
  if (!*p) return g_last_error = cudaErrorMemoryAllocation;
  std::memset(*p, 0xff, bytes);
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t) {
  return cudaMemcpy(dst, src, bytes, kind);
}
cudaError_t cudaMemset(void* p, int value, size_t bytes) {
  if (bytes) std::memset(p, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) { return cudaMemset(p, value, bytes); }

cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned int) {
  static int token;
  *s = reinterpret_cast<cudaStream_t>(&token);
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError(void) { return g_last_error; }
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error (emulated)";
    case cudaErrorInvalidValue: return "invalid argument (emulated)";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (emulated)";
    case cudaErrorMemoryAllocation: return "out of memory (emulated)";
    default: return "error (emulated)";
  }
}

}  // extern "C"
