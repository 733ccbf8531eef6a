// The cpu backend's executor: threadgroups spread over a pool of OS threads; the threads
// of one threadgroup run either as a plain loop (kernels without barriers or simd
// functions) or as cooperative fibers that switch at every barrier and simd function.
//
// Fibers switch with a few lines of assembly that save the callee-saved registers:
// no system call per switch (ucontext's swapcontext makes one to save the signal mask).
// All fibers of a threadgroup run on one OS thread, so `thread_local` threadgroup arrays
// are shared by exactly the threads of one group.
//
// Everything here is private to this library except the extern "C" functions at the end: cpu.py
// links it with an export list, so none of its C++ (the std:: templates it instantiates) can
// bind to another library's code. Kernels reach the barrier and simd exchange through the table
// mlm_cpu_link fills in (mlm_cpu_abi.h).

#include "mlm_cpu_abi.h"

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>
#include <sys/mman.h>
#include <unistd.h>

typedef void (*mlm_group_fn)(void* const*, const mlm_launch*, unsigned, unsigned, unsigned);
typedef void (*mlm_thread_fn)(void* const*, const mlm_launch*, unsigned, unsigned, unsigned, unsigned);

// ------------------------------------------------------------------ context switch
extern "C" void mlm_switch(void** save_sp, void* to_sp);
extern "C" void mlm_fiber_start(void);

#if defined(__x86_64__)
#if defined(__APPLE__)
#define MLM_SYM(name) "_" #name
#define MLM_TYPE(name) ""
#else
#define MLM_SYM(name) #name
#define MLM_TYPE(name) ".type " #name ",@function\n"
#endif
asm(".text\n"
    ".globl " MLM_SYM(mlm_switch) "\n" MLM_TYPE(mlm_switch)
    MLM_SYM(mlm_switch) ":\n"
    "    pushq %rbp\n    pushq %rbx\n    pushq %r12\n    pushq %r13\n    pushq %r14\n    pushq %r15\n"
    "    movq %rsp, (%rdi)\n"
    "    movq %rsi, %rsp\n"
    "    popq %r15\n    popq %r14\n    popq %r13\n    popq %r12\n    popq %rbx\n    popq %rbp\n"
    "    ret\n"
    ".globl " MLM_SYM(mlm_fiber_start) "\n" MLM_TYPE(mlm_fiber_start)
    MLM_SYM(mlm_fiber_start) ":\n"
    "    movq %r12, %rdi\n"
    "    callq *%r13\n"
    "    ud2\n");

// A new fiber's stack: the six registers mlm_switch pops, then its return address.
static void* fiber_stack_init(char* top, void* arg, void (*fn)(void*)) {
    void** sp = reinterpret_cast<void**>(top) - 7;
    sp[0] = nullptr;                               // r15
    sp[1] = nullptr;                               // r14
    sp[2] = reinterpret_cast<void*>(fn);           // r13: entry function
    sp[3] = arg;                                   // r12: its argument
    sp[4] = nullptr;                               // rbx
    sp[5] = nullptr;                               // rbp
    sp[6] = reinterpret_cast<void*>(&mlm_fiber_start);
    return sp;
}
#elif defined(__aarch64__)
#if defined(__APPLE__)
#define MLM_SYM(name) "_" #name
#else
#define MLM_SYM(name) #name
#endif
asm(".text\n"
    ".globl " MLM_SYM(mlm_switch) "\n"
    ".p2align 2\n"
    MLM_SYM(mlm_switch) ":\n"
    "    sub sp, sp, #160\n"
    "    stp x19, x20, [sp, #0]\n    stp x21, x22, [sp, #16]\n    stp x23, x24, [sp, #32]\n"
    "    stp x25, x26, [sp, #48]\n    stp x27, x28, [sp, #64]\n    stp x29, x30, [sp, #80]\n"
    "    stp d8, d9, [sp, #96]\n    stp d10, d11, [sp, #112]\n    stp d12, d13, [sp, #128]\n"
    "    stp d14, d15, [sp, #144]\n"
    "    mov x2, sp\n    str x2, [x0]\n    mov sp, x1\n"
    "    ldp x19, x20, [sp, #0]\n    ldp x21, x22, [sp, #16]\n    ldp x23, x24, [sp, #32]\n"
    "    ldp x25, x26, [sp, #48]\n    ldp x27, x28, [sp, #64]\n    ldp x29, x30, [sp, #80]\n"
    "    ldp d8, d9, [sp, #96]\n    ldp d10, d11, [sp, #112]\n    ldp d12, d13, [sp, #128]\n"
    "    ldp d14, d15, [sp, #144]\n"
    "    add sp, sp, #160\n"
    "    ret\n"
    ".globl " MLM_SYM(mlm_fiber_start) "\n"
    ".p2align 2\n"
    MLM_SYM(mlm_fiber_start) ":\n"
    "    mov x0, x19\n"
    "    blr x20\n"
    "    brk #0\n");

static void* fiber_stack_init(char* top, void* arg, void (*fn)(void*)) {
    void** sp = reinterpret_cast<void**>(top - 160);
    std::memset(sp, 0, 160);
    sp[0] = arg;                                   // x19
    sp[1] = reinterpret_cast<void*>(fn);           // x20
    sp[11] = reinterpret_cast<void*>(&mlm_fiber_start);  // x30: where `ret` goes
    return sp;
}
#else
#error "mlmetal's cpu backend has fiber switches for x86-64 and arm64 only"
#endif

// ------------------------------------------------------------------ fibers of one worker
namespace {

constexpr unsigned kSlotBytes = 64;  // largest value a simd function exchanges (a float4x4 would not fit)

struct Fiber {
    void* sp;
    unsigned lid;
    unsigned round;  // barriers and simd functions passed so far
    bool done;
    Fiber* next;  // the live fibers form a ring in thread-index order
    Fiber* prev;
};

struct Worker {
    std::vector<Fiber> fibers;
    char* stacks = nullptr;
    size_t stack_bytes = 0;
    unsigned capacity = 0;
    void* sched_sp = nullptr;
    Fiber* current = nullptr;
    // Lane l's value sits at byte l*size of its simdgroup's slot area.
    // Two rounds of simd slots alternate, so a lane that resumes early can publish its
    // next value without overwriting one that a slower lane has yet to read.
    std::vector<unsigned char> slots;  // [2][simdgroups][32][kSlotBytes]
    std::vector<unsigned> tags;        // [2][simdgroups][32]: round+1 of the value there
    mlm_thread_fn fn = nullptr;
    void* const* bufs = nullptr;
    const mlm_launch* launch = nullptr;
    unsigned g[3] = {0, 0, 0};

    ~Worker() {
        if (stacks) munmap(stacks, stack_bytes * capacity);
    }
};

thread_local Worker* tls_worker = nullptr;

size_t fiber_stack_size() {
    static size_t size = [] {
        const char* env = std::getenv("MLMETAL_FIBER_STACK_KB");
        size_t kb = env ? std::strtoul(env, nullptr, 10) : 64;
        return (kb < 16 ? 16 : kb) * 1024;
    }();
    return size;
}

// Stacks are mapped once per worker and kept; the lowest page of each is a guard, so an
// overflow faults instead of silently corrupting the neighbouring fiber.
bool ensure_fibers(Worker& w, unsigned count) {
    if (count <= w.capacity) return true;
    if (w.stacks) munmap(w.stacks, w.stack_bytes * w.capacity);
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    w.stack_bytes = (fiber_stack_size() + page - 1) / page * page + page;
    void* mem = mmap(nullptr, w.stack_bytes * count, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        w.stacks = nullptr;
        w.capacity = 0;
        return false;
    }
    w.stacks = static_cast<char*>(mem);
    for (unsigned i = 0; i < count; ++i) mprotect(w.stacks + i * w.stack_bytes, page, PROT_NONE);
    w.capacity = count;
    w.fibers.resize(count);
    return true;
}

// A fiber at a barrier switches straight to the next live fiber of the ring, not through a
// scheduler: one switch per barrier and thread instead of two. Going round the ring in
// thread-index order keeps every round complete before the next begins, which the simd
// slots' double buffering relies on.
void fiber_main(void* arg) {
    Fiber* f = static_cast<Fiber*>(arg);
    Worker* w = tls_worker;
    w->fn(w->bufs, w->launch, w->g[0], w->g[1], w->g[2], f->lid);
    f->done = true;
    Fiber* next = f->next;
    if (next == f) {  // the last live fiber: the threadgroup is done
        w->current = nullptr;
        mlm_switch(&f->sp, w->sched_sp);
    }
    f->prev->next = next;
    next->prev = f->prev;
    w->current = next;
    mlm_switch(&f->sp, next->sp);
}

void yield_fiber(Worker* w) {
    Fiber* f = w->current;
    f->round++;
    Fiber* next = f->next;
    if (next == f) return;  // alone: nobody to wait for
    w->current = next;
    mlm_switch(&f->sp, next->sp);
}

bool run_group_fibers(Worker& w, unsigned count) {
    if (!ensure_fibers(w, count)) return false;
    const unsigned simdgroups = (count + 31) / 32;
    w.slots.resize(size_t(2) * simdgroups * 32 * kSlotBytes);
    w.tags.assign(size_t(2) * simdgroups * 32, 0u);
    for (unsigned lid = 0; lid < count; ++lid) {
        Fiber& f = w.fibers[lid];
        f.lid = lid;
        f.round = 0;
        f.done = false;
        f.next = &w.fibers[(lid + 1) % count];
        f.prev = &w.fibers[(lid + count - 1) % count];
        char* top = w.stacks + (lid + 1) * w.stack_bytes;
        f.sp = fiber_stack_init(top, &f, fiber_main);
    }
    // Start the ring; control comes back here when its last fiber returns.
    w.current = &w.fibers[0];
    mlm_switch(&w.sched_sp, w.fibers[0].sp);
    return true;
}

// ------------------------------------------------------------------ thread pool
struct Job {
    mlm_group_fn group = nullptr;
    mlm_thread_fn thread = nullptr;
    bool fibers = false;
    void* const* bufs = nullptr;
    const mlm_launch* launch = nullptr;
    uint64_t total = 0;
    uint64_t chunk = 1;
    std::atomic<uint64_t> next{0};
    std::atomic<int> failed{0};
};

void run_groups(Job& job, Worker& w) {
    const mlm_launch& L = *job.launch;
    const unsigned count = L.threads[0] * L.threads[1] * L.threads[2];
    for (;;) {
        uint64_t first = job.next.fetch_add(job.chunk, std::memory_order_relaxed);
        if (first >= job.total) return;
        uint64_t last = first + job.chunk < job.total ? first + job.chunk : job.total;
        for (uint64_t i = first; i < last; ++i) {
            unsigned g0 = unsigned(i % L.groups[0]);
            unsigned g1 = unsigned((i / L.groups[0]) % L.groups[1]);
            unsigned g2 = unsigned(i / (uint64_t(L.groups[0]) * L.groups[1]));
            if (!job.fibers) {
                job.group(job.bufs, job.launch, g0, g1, g2);
                continue;
            }
            w.fn = job.thread;
            w.bufs = job.bufs;
            w.launch = job.launch;
            w.g[0] = g0; w.g[1] = g1; w.g[2] = g2;
            if (!run_group_fibers(w, count)) {
                job.failed.store(1);
                return;
            }
        }
    }
}

class Pool {
public:
    explicit Pool(unsigned n) {
        for (unsigned i = 1; i < n; ++i) threads_.emplace_back([this] { loop(); });
    }
    ~Pool() {
        {
            std::lock_guard<std::mutex> lock(m_);
            stop_ = true;
        }
        cv_.notify_all();
        for (auto& t : threads_) t.join();
    }
    unsigned size() const { return unsigned(threads_.size()) + 1; }

    // Runs the job on the pool's threads and the caller's; returns when every group is done.
    void run(Job& job) {
        {
            std::lock_guard<std::mutex> lock(m_);
            job_ = &job;
            pending_ = unsigned(threads_.size());
            generation_++;
        }
        cv_.notify_all();
        run_groups(job, local_worker());
        std::unique_lock<std::mutex> lock(m_);
        done_cv_.wait(lock, [this] { return pending_ == 0; });
        job_ = nullptr;
    }

    static Worker& local_worker() {
        thread_local Worker w;
        tls_worker = &w;
        return w;
    }

private:
    void loop() {
        uint64_t seen = 0;
        for (;;) {
            Job* job;
            {
                std::unique_lock<std::mutex> lock(m_);
                cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
                if (stop_) return;
                seen = generation_;
                job = job_;
            }
            run_groups(*job, local_worker());
            std::lock_guard<std::mutex> lock(m_);
            if (--pending_ == 0) done_cv_.notify_one();
        }
    }

    std::vector<std::thread> threads_;
    std::mutex m_;
    std::condition_variable cv_, done_cv_;
    Job* job_ = nullptr;
    unsigned pending_ = 0;
    uint64_t generation_ = 0;
    bool stop_ = false;
};

Pool* g_pool = nullptr;
std::mutex g_pool_mutex;

// ------------------------------------------------------------------ the kernels' hooks
void cpu_barrier(void) {
    Worker* w = tls_worker;
    if (!w || !w->current) {
        // The wrapper generator runs kernels with barriers as fibers; reaching this means the
        // barrier hid where the source scan could not see it.
        std::fputs("mlmetal: threadgroup_barrier called outside a fiber\n", stderr);
        std::abort();
    }
    yield_fiber(w);
}

const void* cpu_simd_exchange(const void* value, unsigned size, unsigned* lane, unsigned* active) {
    Worker* w = tls_worker;
    if (!w || !w->current || size > kSlotBytes) {
        std::fputs("mlmetal: simd function called outside a fiber or on a value over 64 bytes\n", stderr);
        std::abort();
    }
    Fiber* f = w->current;
    const unsigned my_lane = f->lid & 31u, sg = f->lid >> 5, parity = f->round & 1u;
    const unsigned simdgroups = unsigned(w->tags.size() / 64);
    unsigned char* slots = &w->slots[(size_t(parity) * simdgroups + sg) * 32 * kSlotBytes];
    unsigned* tags = &w->tags[(size_t(parity) * simdgroups + sg) * 32];
    const unsigned tag = f->round + 1;
    std::memcpy(slots + my_lane * size, value, size);
    tags[my_lane] = tag;
    yield_fiber(w);
    unsigned mask = 0;
    for (unsigned l = 0; l < 32; ++l)
        if (tags[l] == tag) mask |= 1u << l;
    *lane = my_lane;
    *active = mask;
    return slots;
}

}  // namespace

// ------------------------------------------------------------------ exported
extern "C" {

// Sets the number of OS threads that run threadgroups (0: one per core).
void mlm_set_threads(unsigned n) {
    std::lock_guard<std::mutex> lock(g_pool_mutex);
    delete g_pool;
    if (n == 0) n = std::thread::hardware_concurrency() ? std::thread::hardware_concurrency() : 1;
    g_pool = new Pool(n);
}

unsigned mlm_threads(void) {
    std::lock_guard<std::mutex> lock(g_pool_mutex);
    return g_pool ? g_pool->size() : 0;
}

// Runs every threadgroup of one dispatch. Returns 0, or 1 when fiber stacks could not be mapped.
int mlm_run(mlm_group_fn group, mlm_thread_fn thread, int fibers, void* const* bufs, const mlm_launch* launch) {
    std::lock_guard<std::mutex> lock(g_pool_mutex);
    if (!g_pool) {
        unsigned n = std::thread::hardware_concurrency();
        g_pool = new Pool(n ? n : 1);
    }
    Job job;
    job.group = group;
    job.thread = thread;
    job.fibers = fibers != 0;
    job.bufs = bufs;
    job.launch = launch;
    job.total = uint64_t(launch->groups[0]) * launch->groups[1] * launch->groups[2];
    // Small chunks keep cores balanced; fibered groups are heavy enough to claim one by one.
    job.chunk = job.fibers ? 1 : (job.total / (uint64_t(g_pool->size()) * 16) + 1);
    if (job.total <= 1 || g_pool->size() == 1) {
        run_groups(job, Pool::local_worker());
    } else {
        g_pool->run(job);
    }
    return job.failed.load();
}

// Fills in a kernel library's hooks (its `mlm_hooks`), right after it is loaded.
void mlm_cpu_link(mlm_cpu_hooks* hooks) {
    hooks->barrier = cpu_barrier;
    hooks->simd_exchange = cpu_simd_exchange;
}

}  // extern "C"
