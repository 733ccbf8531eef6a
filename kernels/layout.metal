// Moving data between layouts. The ops' kernels are templates over the storage type T (float,
// half, bfloat), instantiated as `name`, `name_f16` and `name_bf16`, and move T values as they
// are: every result is bit for bit an input element (or zero).
#include <metal_stdlib>
using namespace metal;

struct TransposeParams {
    uint rows;
    uint cols;
};

// out (cols×rows) = xᵀ (x is rows×cols, row-major), through a 32×32 tile in threadgroup
// memory so that both the read and the write are coalesced. Threadgroups of 32×8 threads,
// each thread moving four elements; the tile's extra column keeps the column reads free
// of bank conflicts. Float only: no op dispatches it (the transpose op is a `gather`); it is the
// threadgroup-memory kernel of `mlmetal demo` and of the wrapper generator's tests.
kernel void transpose(device const float* x [[buffer(0)]],  // extent: p.rows * p.cols
                      device float* out [[buffer(1)]],  // extent: p.rows * p.cols
                      constant TransposeParams& p [[buffer(2)]],
                      uint2 group [[threadgroup_position_in_grid]],
                      uint2 t [[thread_position_in_threadgroup]]) {
    threadgroup float tile[32][33];
    uint col0 = group.x * 32, row0 = group.y * 32;
    for (uint k = 0; k < 32; k += 8) {
        uint r = row0 + t.y + k, c = col0 + t.x;
        if (r < p.rows && c < p.cols) tile[t.y + k][t.x] = x[r * p.cols + c];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint k = 0; k < 32; k += 8) {
        uint r = col0 + t.y + k, c = row0 + t.x;  // row and column of out
        if (r < p.cols && c < p.rows) out[r * p.rows + c] = tile[t.x][t.y + k];
    }
}

struct ChannelCopyParams {
    uint count;          // elements copied: outer·channels·inner
    uint channels;       // channels copied
    uint inner;          // elements per channel per sample (H·W)
    uint src_channels;   // channels of the source tensor ...
    uint src_offset;     // ... and the first one copied
    uint dst_channels;
    uint dst_offset;
};

// Element j of an outer × channels × inner block as (n, c, i), by two divisions (an integer
// division is a dozen instructions on a GPU, and these kernels move a few bytes a thread).
struct ChannelIndex {
    uint n, c, i;
};
inline ChannelIndex channel_index(uint j, uint channels, uint inner) {
    const uint row = j / inner, n = row / channels;
    return ChannelIndex{n, row - n * channels, j - row * inner};
}

// dst[n, dst_offset + c, i] = src[n, src_offset + c, i] for c < channels: one dispatch per
// input of a concat, or the one copy of a slice (and of its gradient).
template <typename T>
kernel void copy_channels(device const T* src [[buffer(0)]],  // extent: p.count / (p.inner * p.channels) * p.src_channels * p.inner
                          device T* dst [[buffer(1)]],  // extent: p.count / (p.inner * p.channels) * p.dst_channels * p.inner
                          constant ChannelCopyParams& p [[buffer(2)]],
                          uint j [[thread_position_in_grid]]) {
    if (j >= p.count) return;
    const ChannelIndex e = channel_index(j, p.channels, p.inner);
    const uint n = e.n, c = e.c, i = e.i;
    dst[(n * p.dst_channels + p.dst_offset + c) * p.inner + i] = src[(n * p.src_channels + p.src_offset + c) * p.inner + i];
}

template [[host_name("copy_channels")]] [[kernel]] decltype(copy_channels<float>) copy_channels<float>;
template [[host_name("copy_channels_f16")]] [[kernel]] decltype(copy_channels<half>) copy_channels<half>;
template [[host_name("copy_channels_bf16")]] [[kernel]] decltype(copy_channels<bfloat>) copy_channels<bfloat>;

// copy_channels by 16-byte words, for any storage type: where a channel's elements fill whole
// words (H·W·sizeof(T) a multiple of 16, as a convolution network's feature maps do), a thread
// moves 4 floats or 8 half or bfloat values at once. p counts words, not elements.
kernel void copy_channel_words(device const uint4* src [[buffer(0)]],  // extent: p.count / (p.inner * p.channels) * p.src_channels * p.inner
                               device uint4* dst [[buffer(1)]],  // extent: p.count / (p.inner * p.channels) * p.dst_channels * p.inner
                               constant ChannelCopyParams& p [[buffer(2)]],
                               uint j [[thread_position_in_grid]]) {
    if (j >= p.count) return;
    const ChannelIndex e = channel_index(j, p.channels, p.inner);
    const uint n = e.n, c = e.c, i = e.i;
    dst[(n * p.dst_channels + p.dst_offset + c) * p.inner + i] = src[(n * p.src_channels + p.src_offset + c) * p.inner + i];
}

struct SliceChannelsGradParams {
    uint count;       // elements of dx: outer·channels·inner
    uint channels;    // dx's channels
    uint inner;       // elements per channel per sample (H·W)
    uint g_channels;  // the slice's channels ...
    uint start;       // ... and the first of dx's that it fills
};

// dx of slice_channels: g in channels start … start + g_channels − 1, 0 in the others, written
// as one read (or zero) for every element of dx (no zero fill first).
template <typename T>
kernel void slice_channels_grad(device const T* g [[buffer(0)]],  // extent: p.count / p.channels * p.g_channels
                                device T* dx [[buffer(1)]],  // extent: p.count
                                constant SliceChannelsGradParams& p [[buffer(2)]],
                                uint j [[thread_position_in_grid]]) {
    if (j >= p.count) return;
    const ChannelIndex e = channel_index(j, p.channels, p.inner);
    const uint n = e.n, c = e.c, i = e.i;
    bool inside = c >= p.start && c - p.start < p.g_channels;
    dx[j] = inside ? g[(n * p.g_channels + c - p.start) * p.inner + i] : T(0.0f);
}

template [[host_name("slice_channels_grad")]] [[kernel]] decltype(slice_channels_grad<float>) slice_channels_grad<float>;
template [[host_name("slice_channels_grad_f16")]] [[kernel]] decltype(slice_channels_grad<half>) slice_channels_grad<half>;
template [[host_name("slice_channels_grad_bf16")]] [[kernel]] decltype(slice_channels_grad<bfloat>) slice_channels_grad<bfloat>;

struct GatherParams {
    uint n;          // output elements
    uint dims;       // merged axes of the output, at most 8
    uint src_size;   // x's elements
    int offset;      // the element of x that output element 0 reads
    uint shape[8];   // the output's merged axes
    int stride[8];   // x's stride along each, in elements: negative along a reversed slice, 0 to broadcast
};

// out[i] = x[offset + Σ_d i_d·stride_d], i_d the coordinates of i: a permutation of the axes, a
// strided slice or a broadcast, each one strided read into a contiguous output. (Tensors are
// contiguous, so a view is a copy; the host merges axes the strides walk as one.)
template <typename T>
kernel void gather(device const T* x [[buffer(0)]],  // extent: p.src_size
                   device T* out [[buffer(1)]],  // extent: p.n
                   constant GatherParams& p [[buffer(2)]],
                   uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    int at = p.offset;
    uint rest = i;
    for (uint d = p.dims; d-- > 0;) {
        at += int(rest % p.shape[d]) * p.stride[d];
        rest /= p.shape[d];
    }
    out[i] = x[at];
}

template [[host_name("gather")]] [[kernel]] decltype(gather<float>) gather<float>;
template [[host_name("gather_f16")]] [[kernel]] decltype(gather<half>) gather<half>;
template [[host_name("gather_bf16")]] [[kernel]] decltype(gather<bfloat>) gather<bfloat>;

struct SliceGradParams {
    uint n;            // elements of x (and of the gradient written)
    uint dims;         // x's axes, at most 8
    uint g_size;       // the slice's elements
    uint shape[8];     // x's axes
    int start[8];      // the slice's first index along each ...
    int step[8];       // ... its step (negative: reversed) ...
    uint count[8];     // ... and how many indices it takes
    uint g_stride[8];  // the slice's stride along each of x's axes (0 along an axis indexed by an integer)
};

// dx of strided_slice: g where x's element is in the slice, 0 elsewhere, written as a read for
// every element of dx (no zero fill first, no scattered writes).
template <typename T>
kernel void strided_slice_grad(device const T* g [[buffer(0)]],  // extent: p.g_size
                               device T* out [[buffer(1)]],  // extent: p.n
                               constant SliceGradParams& p [[buffer(2)]],
                               uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    uint at = 0, rest = i;
    bool inside = true;
    for (uint d = p.dims; d-- > 0;) {
        int from_start = int(rest % p.shape[d]) - p.start[d];
        rest /= p.shape[d];
        int k = from_start / p.step[d];
        inside = inside && k * p.step[d] == from_start && k >= 0 && uint(k) < p.count[d];
        at += uint(k) * p.g_stride[d];
    }
    out[i] = inside ? g[at] : T(0.0f);
}

template [[host_name("strided_slice_grad")]] [[kernel]] decltype(strided_slice_grad<float>) strided_slice_grad<float>;
template [[host_name("strided_slice_grad_f16")]] [[kernel]] decltype(strided_slice_grad<half>) strided_slice_grad<half>;
template [[host_name("strided_slice_grad_bf16")]] [[kernel]] decltype(strided_slice_grad<bfloat>) strided_slice_grad<bfloat>;
