// Kernels that write predicate words on the device (DESIGN §1, MPSPredicate): a later
// predicated dispatch reads the word and runs only if it is nonzero, so the host never
// waits to decide whether work should run.
//
// Every kernel takes the whole predicate buffer twice, `words` in and `out`, and writes
// out = words with word `p.word` replaced. An op is then a pure function (it tests against a
// reference like any op), while an in-place write — what a graph does — passes the same
// buffer as both: the copy becomes a no-op for every other word. Many predicates share one
// buffer, so a writer must never touch the words it does not own.
//
// `predicate_finite` is the one writer over many threadgroups (a gradient may hold millions of
// elements): it only ever clears its word, with an atomic store, so its threadgroups need no
// order among themselves; when out is not words, a first dispatch copies the words.
//
// A writer may itself be predicated by the word it writes (the decoder's "keep going" word
// predicates its own update). That is safe because each writer runs one threadgroup and
// writes the word after every thread has passed the entry check: the single writer thread
// of set/decrement/compare, or thread 0 after the barrier in all/any.
#include <metal_stdlib>
using namespace metal;

struct PredicateSetParams {
    uint count;  // words in the buffer
    uint word;   // the word written
    uint value;
};

struct PredicateWordParams {
    uint count;
    uint word;
};

// The threads of one threadgroup copy every word but `word` from words to out.
inline void copy_other_words(device const uint* words, device uint* out, uint count, uint word,
                                    uint lid, uint tpg) {
    for (uint j = lid; j < count; j += tpg) {
        if (j != word) out[j] = words[j];
    }
}

// out[word] = value
kernel void predicate_set(device const uint* words [[buffer(0)]],  // extent: p.count
                          device uint* out [[buffer(1)]],  // extent: p.count
                          constant PredicateSetParams& p [[buffer(2)]],
                          uint lid [[thread_index_in_threadgroup]],
                          uint tpg [[threads_per_threadgroup]]) {
    copy_other_words(words, out, p.count, p.word, lid, tpg);
    if (lid == 0) out[p.word] = p.value;
}

// out[word] = max(words[word], 1) - 1: a countdown that stops at 0 (a step budget).
kernel void predicate_decrement(device const uint* words [[buffer(0)]],  // extent: p.count
                                device uint* out [[buffer(1)]],  // extent: p.count
                                constant PredicateWordParams& p [[buffer(2)]],
                                uint lid [[thread_index_in_threadgroup]],
                                uint tpg [[threads_per_threadgroup]]) {
    copy_other_words(words, out, p.count, p.word, lid, tpg);
    if (lid == 0) {
        uint v = words[p.word];
        out[p.word] = v > 0u ? v - 1u : 0u;
    }
}

struct PredicateCompareParams {
    uint count;
    uint word;
    uint index;       // the element of x compared
    uint compare;     // 0 >, 1 >=, 2 <, 3 <=, 4 ==, 5 !=
    float threshold;
};

// out[word] = (x[index] <compare> threshold) ? 1 : 0, e.g. "the loss is still above 0.01".
kernel void predicate_compare(device const float* x [[buffer(0)]],  // extent: p.index + 1
                              device const uint* words [[buffer(1)]],  // extent: p.count
                              device uint* out [[buffer(2)]],  // extent: p.count
                              constant PredicateCompareParams& p [[buffer(3)]],
                              uint lid [[thread_index_in_threadgroup]],
                              uint tpg [[threads_per_threadgroup]]) {
    copy_other_words(words, out, p.count, p.word, lid, tpg);
    if (lid != 0) return;
    float v = x[p.index], t = p.threshold;
    bool r;
    switch (p.compare) {
        case 0: r = v > t; break;
        case 1: r = v >= t; break;
        case 2: r = v < t; break;
        case 3: r = v <= t; break;
        case 4: r = v == t; break;
        default: r = v != t; break;
    }
    out[p.word] = r ? 1u : 0u;
}

struct PredicateReduceParams {
    uint count;
    uint word;
    uint n;  // flags
};

// How many of the flags are nonzero, counted by one threadgroup: each thread counts a strided
// share, thread 0 adds the shares up. Flag vectors here are per-sequence states (a few
// hundred words), so one threadgroup is plenty, and it is what makes self-predication safe.
inline uint count_nonzero(device const uint* flags, uint n, threadgroup uint* shares, uint lid, uint tpg) {
    uint c = 0;
    for (uint j = lid; j < n; j += tpg) c += flags[j] != 0u ? 1u : 0u;
    shares[lid] = c;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    uint total = 0;
    if (lid == 0) {
        for (uint j = 0; j < tpg; ++j) total += shares[j];
    }
    return total;  // meaningful on thread 0 only
}

// out[word] = 1 if every flag is nonzero, else 0
kernel void predicate_all(device const uint* flags [[buffer(0)]],  // extent: p.n
                          device const uint* words [[buffer(1)]],  // extent: p.count
                          device uint* out [[buffer(2)]],  // extent: p.count
                          constant PredicateReduceParams& p [[buffer(3)]],
                          uint lid [[thread_index_in_threadgroup]],
                          uint tpg [[threads_per_threadgroup]]) {
    threadgroup uint shares[1024];
    copy_other_words(words, out, p.count, p.word, lid, tpg);
    uint total = count_nonzero(flags, p.n, shares, lid, tpg);
    if (lid == 0) out[p.word] = total == p.n ? 1u : 0u;
}

// out[word] = 1 if any flag is nonzero, else 0
kernel void predicate_any(device const uint* flags [[buffer(0)]],  // extent: p.n
                          device const uint* words [[buffer(1)]],  // extent: p.count
                          device uint* out [[buffer(2)]],  // extent: p.count
                          constant PredicateReduceParams& p [[buffer(3)]],
                          uint lid [[thread_index_in_threadgroup]],
                          uint tpg [[threads_per_threadgroup]]) {
    threadgroup uint shares[1024];
    copy_other_words(words, out, p.count, p.word, lid, tpg);
    uint total = count_nonzero(flags, p.n, shares, lid, tpg);
    if (lid == 0) out[p.word] = total > 0u ? 1u : 0u;
}

struct PredicateFiniteParams {
    uint count;
    uint word;
    uint n;     // elements of x
    uint copy;  // 1: this dispatch only copies words to out (the first of two, when out is not words)
};

// Inf or NaN: every exponent bit set. Tested on the bits, since fast math (metalcompute's
// default) lets the compiler assume isinf and isnan are false.
inline bool not_finite(float v) {
    return (as_type<uint>(v) & 0x7f800000u) == 0x7f800000u;
}

// out[word] = 0 if any element of x is Inf or NaN; otherwise out[word] is left as it is. Over a
// storage type, as gradients of half activations are half: float(x) keeps Inf and NaN. A grid of
// any size strides over x; a thread that meets a non-finite value clears the word and stops.
// The loss scaler ANDs every parameter gradient's check into one word this way.
template <typename T>
kernel void predicate_finite(device const T* x [[buffer(0)]],  // extent: p.n
                             device const uint* words [[buffer(1)]],  // extent: p.count
                             device atomic_uint* out [[buffer(2)]],  // extent: p.count
                             constant PredicateFiniteParams& p [[buffer(3)]],
                             uint i [[thread_position_in_grid]],
                             uint grid [[threads_per_grid]]) {
    if (p.copy) {
        for (uint j = i; j < p.count; j += grid) atomic_store_explicit(&out[j], words[j], memory_order_relaxed);
        return;
    }
    for (uint j = i; j < p.n; j += grid) {
        if (not_finite(float(x[j]))) {
            atomic_store_explicit(&out[p.word], 0u, memory_order_relaxed);
            return;
        }
    }
}

template [[host_name("predicate_finite")]] [[kernel]] decltype(predicate_finite<float>) predicate_finite<float>;
template [[host_name("predicate_finite_f16")]] [[kernel]] decltype(predicate_finite<half>) predicate_finite<half>;
template [[host_name("predicate_finite_bf16")]] [[kernel]] decltype(predicate_finite<bfloat>) predicate_finite<bfloat>;
