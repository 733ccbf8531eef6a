// A small Monte-Carlo path tracer: the denoiser's training data (issue 9).
//
// A scene is a room — a floor and up to three walls, open at the top and behind the camera, so
// escaping rays see a dim sky — holding spheres and one area light (a one-sided rectangle or a
// sphere). Every surface is Lambert plus a normalised Phong lobe, f = kd/π + ks·(e+2)/(2π)·cos^e α
// with α the angle to the mirror direction; kd + ks ≤ 1 keeps it energy-conserving.
//
// One thread per pixel traces `spp` paths of at most `bounces` vertices. At every vertex the
// light is sampled directly (a point uniform on its area — for a sphere, on the half facing the
// vertex — and one shadow ray), and a BSDF-sampled
// ray continues the path; rays that hit the light after the first vertex add nothing, since the
// light sample already counted that light (no double counting, no multiple importance
// sampling). Next-event estimation keeps a 4-spp render noisy but free of the fireflies a pure
// path tracer makes with a small light, so a denoiser has noise it can learn to remove.
//
// Random numbers are Philox4x32-10 (as in random.metal) with key (seed, scene seed) and counter
// (pixel, sample, bounce, k): a pure function of where they are used, so the images are the
// same on every backend and in the float64 reference (mlmetal/reference/raytrace.py) up to
// float rounding, and do not depend on thread order or on a scene's place in a batch.
//
// Outputs are NCHW float32, linear radiance (the light itself is far brighter than 1). The
// albedo (kd + ks) and the viewer-facing world-space normal are those of the first hit of the
// ray through the pixel's centre: noise-free and the same at any spp. A miss gives zeros.

#include <metal_stdlib>
using namespace metal;

// ---------------------------------------------------------------- the scene buffer

// mlmetal/raytrace.py packs scenes from these definitions as it parses them: a field is one
// row of four 32-bit words, so the array sizes below are the scene capacity.
struct Surface {
    float4 shape;    // sphere: centre xyz, radius w; plane: unit normal xyz, offset w (n·p = w)
    float4 diffuse;  // Lambert albedo kd, rgb
    float4 glossy;   // Phong reflectance ks rgb, exponent e in w
};

struct Scene {
    uint4 header;      // x: spheres in use, y: planes in use, z: light shape, w: scene seed
    float4 sky;        // radiance of rays leaving the room, rgb
    float4 eye;        // camera position
    float4 view;       // x: tan(vertical field of view / 2), the image plane's half height at distance 1
    float4 forward;    // camera axes, unit vectors
    float4 right;
    float4 up;
    float4 light_at;   // rectangle corner or sphere centre
    float4 light_u;    // rectangle edges; the light shines towards u × v (sphere: radius in u.x)
    float4 light_v;
    float4 radiance;   // the light's emitted radiance, rgb
    Surface spheres[8];
    Surface planes[4];
};

enum { LIGHT_RECT = 0, LIGHT_SPHERE = 1 };

struct RenderParams {
    uint width;
    uint height;
    uint scenes;
    uint spp;      // paths per pixel
    uint bounces;  // path vertices: 1 is direct light only
    uint seed;     // noise seed, the first key word
};

// Surface ids of a hit: spheres 0…7, planes PLANE0…, the light, nothing.
#define PLANE0 8
#define HIT_LIGHT 100
#define HIT_NONE -1

// Rays start this far off the surface they leave (along the facing normal) and ignore hits
// closer than T_MIN: scenes are metres across, so neither hides real geometry.
#define RAY_OFFSET 1e-3f
#define T_MIN 1e-4f

inline float3 xyz(float4 v) { return float3(v.x, v.y, v.z); }

// ---------------------------------------------------------------- random numbers

#include "philox.h"

// [0, 1) from the top 24 bits: exact in float32, so both precisions see the same number.
inline float unit(uint x) { return float(x >> 8) * 0x1.0p-24f; }

// ---------------------------------------------------------------- intersection

struct Hit {
    float t;
    int id;
    float3 normal;  // geometric, unit; not yet turned towards the ray
};

// d is a unit vector. The discriminant is r² − |oc − b·d|² (the squared distance of the centre
// from the line), not b² − (|oc|² − r²): for a small sphere far away, that difference of two
// large numbers loses the few digits that decide where the ray meets the sphere.
inline float sphere_t(float3 o, float3 d, float4 s) {
    float3 oc = o - xyz(s);
    float b = dot(oc, d);
    float3 q = oc - b * d;
    float disc = s.w * s.w - dot(q, q);
    if (disc < 0.0f) return INFINITY;
    float h = precise::sqrt(disc);
    return -b - h > T_MIN ? -b - h : -b + h > T_MIN ? -b + h : INFINITY;
}

inline float plane_t(float3 o, float3 d, float4 pl) {
    float den = dot(xyz(pl), d);
    if (fabs(den) < 1e-12f) return INFINITY;
    float t = (pl.w - dot(xyz(pl), o)) / den;
    return t > T_MIN ? t : INFINITY;
}

// The light rectangle is the parallelogram corner + a·u + b·v, 0 ≤ a, b ≤ 1 (u ⟂ v).
inline float rect_t(float3 o, float3 d, float3 corner, float3 u, float3 v) {
    float3 n = cross(u, v);
    float den = dot(n, d);
    if (fabs(den) < 1e-12f) return INFINITY;
    float t = dot(corner - o, n) / den;
    if (!(t > T_MIN)) return INFINITY;
    float3 q = o + t * d - corner;
    float a = dot(q, u) / dot(u, u), b = dot(q, v) / dot(v, v);
    return a >= 0.0f && a <= 1.0f && b >= 0.0f && b <= 1.0f ? t : INFINITY;
}

inline Hit intersect(device const Scene& s, float3 o, float3 d) {
    Hit h;
    h.t = INFINITY;
    h.id = HIT_NONE;
    h.normal = float3(0.0f);
    for (int i = 0; i < int(s.header.x); ++i) {
        float t = sphere_t(o, d, s.spheres[i].shape);
        if (t < h.t) { h.t = t; h.id = i; }
    }
    for (int i = 0; i < int(s.header.y); ++i) {
        float t = plane_t(o, d, s.planes[i].shape);
        if (t < h.t) { h.t = t; h.id = PLANE0 + i; }
    }
    float3 la = xyz(s.light_at), lu = xyz(s.light_u), lv = xyz(s.light_v);
    float tl = s.header.z == LIGHT_SPHERE ? sphere_t(o, d, float4(la.x, la.y, la.z, lu.x)) : rect_t(o, d, la, lu, lv);
    if (tl < h.t) { h.t = tl; h.id = HIT_LIGHT; }

    if (h.id == HIT_LIGHT) {
        h.normal = normalize(s.header.z == LIGHT_SPHERE ? o + h.t * d - la : cross(lu, lv));
    } else if (h.id >= PLANE0) {
        h.normal = xyz(s.planes[h.id - PLANE0].shape);
    } else if (h.id >= 0) {
        // Normalised rather than divided by the radius: rounding in t would otherwise leave it
        // off unit length, and the error grows from bounce to bounce.
        h.normal = normalize(o + h.t * d - xyz(s.spheres[h.id].shape));
    }
    return h;
}

// Whether anything but the light lies on the segment o + t·d, 0 < t < dist. The light cannot
// shadow its own sample: a point of a convex light facing the shaded point is visible from it.
inline bool occluded(device const Scene& s, float3 o, float3 d, float dist) {
    for (int i = 0; i < int(s.header.x); ++i)
        if (sphere_t(o, d, s.spheres[i].shape) < dist) return true;
    for (int i = 0; i < int(s.header.y); ++i)
        if (plane_t(o, d, s.planes[i].shape) < dist) return true;
    return false;
}

inline Surface surface(device const Scene& s, int id) {
    return id >= PLANE0 ? s.planes[id - PLANE0] : s.spheres[id];
}

// ---------------------------------------------------------------- shading

inline float mean3(float3 v) { return (v.x + v.y + v.z) * (1.0f / 3.0f); }

// The BRDF for light arriving along wi, with r the mirror direction of the incoming ray.
// (The glossy test only skips a pow: walls and matte spheres are most of what rays hit.)
inline float3 brdf(Surface m, float3 r, float3 wi) {
    float3 f = xyz(m.diffuse) * M_1_PI_F;
    if (m.glossy.x + m.glossy.y + m.glossy.z > 0.0f) {
        float e = m.glossy.w;
        f += xyz(m.glossy) * ((e + 2.0f) * (0.5f * M_1_PI_F) * precise::pow(max(dot(r, wi), 0.0f), e));
    }
    return f;
}

// A unit vector in the frame (t, b, n) of a unit n (Duff et al., "Building an orthonormal
// basis, revisited", 2017): no normalisation and no special case but the sign of n.z.
inline float3 from_frame(float3 n, float x, float y, float z) {
    float sgn = n.z >= 0.0f ? 1.0f : -1.0f;
    float a = -1.0f / (sgn + n.z);
    float c = n.x * n.y * a;
    float3 t = float3(1.0f + sgn * n.x * n.x * a, sgn * c, -sgn * n.x);
    float3 b = float3(c, sgn + n.y * n.y * a, -n.y);
    return x * t + y * b + z * n;
}

// A direction around axis with cos θ = `cos_t` and azimuth 2π·u.
inline float3 around(float3 axis, float cos_t, float u) {
    float sin_t = precise::sqrt(max(0.0f, 1.0f - cos_t * cos_t));
    float c;
    float sn = precise::sincos(2.0f * M_PI_F * u, c);
    return from_frame(axis, sin_t * c, sin_t * sn, cos_t);
}

// Radiance the light sends to x (facing normal n) through one uniform sample of its area,
// times the BRDF and cosines, divided by the sample's area density (1 / area).
inline float3 light_sample(device const Scene& s, Surface m, float3 x, float3 n, float3 r, float u1, float u2) {
    float3 la = xyz(s.light_at), lu = xyz(s.light_u), lv = xyz(s.light_v);
    float3 y, ny;
    float area;
    if (s.header.z == LIGHT_SPHERE) {
        // Uniform on the half of the sphere facing x: the other half can never be seen.
        float radius = lu.x;
        ny = around(normalize(x - la), u1, u2);
        y = la + radius * ny;
        area = 2.0f * M_PI_F * radius * radius;
    } else {
        float3 c = cross(lu, lv);
        area = length(c);
        ny = c / area;
        y = la + u1 * lu + u2 * lv;
    }
    float3 to = y - x;
    float dist2 = dot(to, to);
    float dist = precise::sqrt(dist2);
    float3 wi = to / dist;
    float cos_x = dot(n, wi), cos_y = -dot(ny, wi);
    if (cos_x <= 0.0f || cos_y <= 0.0f) return float3(0.0f);
    float3 o = x + RAY_OFFSET * n;
    if (occluded(s, o, wi, dist * (1.0f - 1e-4f))) return float3(0.0f);
    return xyz(s.radiance) * brdf(m, r, wi) * (cos_x * cos_y * area / dist2);
}

// ---------------------------------------------------------------- the kernel

// The direction through image point (px, py) (pixel units, y down).
inline float3 camera_ray(device const Scene& s, constant RenderParams& p, float px, float py) {
    float tan_y = s.view.x, tan_x = tan_y * float(p.width) / float(p.height);
    float sx = (2.0f * px / float(p.width) - 1.0f) * tan_x;
    float sy = (1.0f - 2.0f * py / float(p.height)) * tan_y;
    return normalize(xyz(s.forward) + sx * xyz(s.right) + sy * xyz(s.up));
}

// One path's radiance. Bounce b draws its numbers from counter (pixel, sample, b, k):
// k = 0 gives the light sample (x, y) and the new direction (z, w); k = 1 the lobe choice (x)
// and, on the camera ray, the position inside the pixel (y, z). The k = 1 block is made only
// where it is used (a surface with both lobes; the camera ray): Philox is a good part of the
// cost of a bounce.
inline float3 trace(device const Scene& s, constant RenderParams& p, uint px, uint py, uint sample) {
    uint2 key = uint2(p.seed, s.header.w);
    uint pixel = py * p.width + px;
    float3 o = xyz(s.eye), d = float3(0.0f), radiance = float3(0.0f), weight = float3(1.0f);
    for (uint bounce = 0; bounce < p.bounces; ++bounce) {
        uint4 r0 = philox4x32_10(uint4(pixel, sample, bounce, 0u), key);
        if (bounce == 0u) {
            uint4 r1 = philox4x32_10(uint4(pixel, sample, 0u, 1u), key);
            d = camera_ray(s, p, float(px) + unit(r1.y), float(py) + unit(r1.z));
        }
        Hit h = intersect(s, o, d);
        if (h.id == HIT_NONE) {
            radiance += weight * xyz(s.sky);
            break;
        }
        if (h.id == HIT_LIGHT) {
            if (bounce == 0u && dot(h.normal, d) < 0.0f) radiance += xyz(s.radiance);
            break;
        }
        Surface m = surface(s, h.id);
        float3 n = dot(h.normal, d) < 0.0f ? h.normal : -h.normal;
        float3 x = o + h.t * d;
        float3 r = d - 2.0f * dot(n, d) * n;
        radiance += weight * light_sample(s, m, x, n, r, unit(r0.x), unit(r0.y));

        // Continue by the lobe picked in proportion to its reflectance, weighting by the
        // mixture's density (either lobe could have made the direction).
        float wd = mean3(xyz(m.diffuse)), ws = mean3(xyz(m.glossy));
        if (bounce + 1u == p.bounces || wd + ws <= 0.0f) break;
        float pd = wd / (wd + ws), e = m.glossy.w;
        bool diffuse = pd == 1.0f || (pd > 0.0f && unit(philox4x32_10(uint4(pixel, sample, bounce, 1u), key).x) < pd);
        float3 wi = normalize(diffuse ? around(n, precise::sqrt(unit(r0.z)), unit(r0.w))
                                      : around(r, precise::pow(unit(r0.z), 1.0f / (e + 1.0f)), unit(r0.w)));
        float cos_n = dot(n, wi);
        if (cos_n <= 0.0f) break;
        float pdf = pd * cos_n * M_1_PI_F;
        if (pd < 1.0f) pdf += (1.0f - pd) * (e + 1.0f) * (0.5f * M_1_PI_F) * precise::pow(max(dot(r, wi), 0.0f), e);
        if (!(pdf > 0.0f)) break;
        weight *= brdf(m, r, wi) * (cos_n / pdf);
        o = x + RAY_OFFSET * n;
        d = wi;
    }
    return radiance;
}

// rgb, albedo, normal: (scenes, 3, height, width). Threads cover (x, y, scene).
kernel void raytrace(device float* rgb [[buffer(0)]],  // extent: p.scenes * 3 * p.width * p.height
                     device float* albedo [[buffer(1)]],  // extent: p.scenes * 3 * p.width * p.height
                     device float* normal [[buffer(2)]],  // extent: p.scenes * 3 * p.width * p.height
                     device const Scene* scenes [[buffer(3)]],  // extent: p.scenes
                     constant RenderParams& p [[buffer(4)]],
                     uint3 gid [[thread_position_in_grid]]) {
    if (gid.x >= p.width || gid.y >= p.height || gid.z >= p.scenes) return;
    device const Scene& s = scenes[gid.z];

    float3 sum = float3(0.0f);
    for (uint i = 0; i < p.spp; ++i) sum += trace(s, p, gid.x, gid.y, i);
    float3 color = sum / float(p.spp);

    // First hit through the pixel centre.
    float3 d = camera_ray(s, p, float(gid.x) + 0.5f, float(gid.y) + 0.5f);
    Hit h = intersect(s, xyz(s.eye), d);
    float3 a = float3(0.0f), n = float3(0.0f);
    if (h.id != HIT_NONE) {
        n = dot(h.normal, d) < 0.0f ? h.normal : -h.normal;
        if (h.id == HIT_LIGHT) {
            a = float3(1.0f);
        } else {
            Surface m = surface(s, h.id);
            a = xyz(m.diffuse) + xyz(m.glossy);
        }
    }

    uint plane = p.width * p.height;
    uint at = gid.z * 3u * plane + gid.y * p.width + gid.x;
    rgb[at] = color.x;            rgb[at + plane] = color.y;        rgb[at + 2u * plane] = color.z;
    albedo[at] = a.x;             albedo[at + plane] = a.y;         albedo[at + 2u * plane] = a.z;
    normal[at] = n.x;             normal[at + plane] = n.y;         normal[at + 2u * plane] = n.z;
}
