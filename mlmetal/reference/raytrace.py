"""Float64 numpy reference of the path tracer of kernels/raytrace.metal.

The same algorithm, step for step, on arrays of paths instead of one thread per pixel: the
same Philox numbers (mlmetal.reference.random, exact integer arithmetic) at the same counters,
the same float32 scene values, the same intersection, light sampling and lobe choice. Only the
arithmetic is float64, so kernel and reference agree to float rounding wherever a path takes
the same decisions — everywhere but a few rays that graze an edge.

Meant for tiny images (8×8 at a few spp); all paths of an image are live at once.
"""

from __future__ import annotations

import numpy as np

from mlmetal import raytrace as rt
from mlmetal.reference.random import philox4x32_10

RAY_OFFSET, T_MIN = 1e-3, 1e-4  # as the kernel's (its float32 values, so both ignore the same hits)
RAY_OFFSET, T_MIN = float(np.float32(RAY_OFFSET)), float(np.float32(T_MIN))
INF = np.inf
PLANE0, HIT_LIGHT, HIT_NONE = 8, 100, -1


def _dot(a, b):
    return np.einsum("...i,...i->...", a, b)


def _normalize(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _unit(words):
    """[0, 1) from the top 24 bits of uint32 words."""
    return (words >> np.uint32(8)).astype(np.float64) * 2.0**-24


def _sphere_t(o, d, centre, radius):
    oc = o - centre
    b = _dot(oc, d)
    q = oc - b[:, None] * d
    disc = radius * radius - _dot(q, q)
    h = np.sqrt(np.maximum(disc, 0.0))
    t = np.where(-b - h > T_MIN, -b - h, np.where(-b + h > T_MIN, -b + h, INF))
    return np.where(disc < 0, INF, t)


def _plane_t(o, d, plane):
    n = plane[:3]
    den = d @ n
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (plane[3] - o @ n) / den
    return np.where((np.abs(den) < 1e-12) | ~(t > T_MIN), INF, t)


def _rect_t(o, d, corner, u, v):
    n = np.cross(u, v)
    den = d @ n
    with np.errstate(divide="ignore", invalid="ignore"):
        t = ((corner - o) @ n) / den
    q = o + np.where(np.isfinite(t), t, 0.0)[:, None] * d - corner
    a, b = q @ u / (u @ u), q @ v / (v @ v)
    inside = (a >= 0) & (a <= 1) & (b >= 0) & (b <= 1)
    return np.where((np.abs(den) < 1e-12) | ~(t > T_MIN) | ~inside, INF, t)


class _Scene:
    """A Scene's arrays in float64 (its float32 values, exactly)."""

    def __init__(self, s: rt.Scene):
        f = lambda a: np.asarray(a, np.float64)  # noqa: E731
        self.spheres, self.planes = f(s.spheres), f(s.planes)
        self.diffuse, self.glossy = f(s.diffuse), f(s.glossy)
        self.ns = len(s.spheres)
        self.sky, self.radiance = f(s.sky), f(s.light.radiance)
        self.eye, self.forward, self.right, self.up = (f(getattr(s.camera, n)) for n in ("eye", "forward", "right", "up"))
        self.tan_y = float(s.camera.tan_half_fov)
        self.sphere_light = s.light.shape == "sphere"
        self.light_at, self.light_u, self.light_v = f(s.light.position), f(s.light.u), f(s.light.v)
        self.light_radius = float(s.light.radius)
        self.key = np.array([0, s.seed], np.uint64)

    def surface_index(self, ids):
        """Row of diffuse/glossy for surface ids (spheres first, then planes)."""
        return np.where(ids >= PLANE0, ids - PLANE0 + self.ns, ids)

    def intersect(self, o, d):
        """(t, id, geometric normal) of the nearest hit of each ray."""
        t = np.full(len(o), INF)
        ids = np.full(len(o), HIT_NONE)
        for i, sp in enumerate(self.spheres):
            ti = _sphere_t(o, d, sp[:3], sp[3])
            ids, t = np.where(ti < t, i, ids), np.minimum(ti, t)
        for i, pl in enumerate(self.planes):
            ti = _plane_t(o, d, pl)
            ids, t = np.where(ti < t, PLANE0 + i, ids), np.minimum(ti, t)
        if self.sphere_light:
            tl = _sphere_t(o, d, self.light_at, self.light_radius)
        else:
            tl = _rect_t(o, d, self.light_at, self.light_u, self.light_v)
        ids, t = np.where(tl < t, HIT_LIGHT, ids), np.minimum(tl, t)

        x = o + np.where(np.isfinite(t), t, 0.0)[:, None] * d
        normal = np.zeros_like(o)
        sph = (ids >= 0) & (ids < PLANE0)
        centre = self.spheres[np.where(sph, ids, 0)]
        normal[sph] = _normalize(x[sph] - centre[sph, :3])
        pl = (ids >= PLANE0) & (ids < HIT_LIGHT)
        normal[pl] = self.planes[ids[pl] - PLANE0, :3]
        lt = ids == HIT_LIGHT
        if self.sphere_light:
            normal[lt] = _normalize(x[lt] - self.light_at)
        else:
            c = np.cross(self.light_u, self.light_v)
            normal[lt] = c / np.linalg.norm(c)
        return t, ids, normal

    def occluded(self, o, d, dist):
        """Whether a sphere or plane lies on each segment o + t·d, 0 < t < dist."""
        hit = np.zeros(len(o), bool)
        for sp in self.spheres:
            hit |= _sphere_t(o, d, sp[:3], sp[3]) < dist
        for pl in self.planes:
            hit |= _plane_t(o, d, pl) < dist
        return hit

    def camera_ray(self, px, py, width, height):
        tan_x = self.tan_y * width / height
        sx = (2.0 * px / width - 1.0) * tan_x
        sy = (1.0 - 2.0 * py / height) * self.tan_y
        d = self.forward + sx[:, None] * self.right + sy[:, None] * self.up
        return _normalize(d)


def _brdf(kd, ks, e, r, wi):
    lobe = (e + 2.0) * (0.5 / np.pi) * np.maximum(_dot(r, wi), 0.0) ** e
    return kd / np.pi + ks * lobe[:, None]


def _from_frame(n, x, y, z):
    """x·t + y·b + z·n in the Duff et al. frame of unit normals n."""
    sgn = np.where(n[:, 2] >= 0, 1.0, -1.0)
    a = -1.0 / (sgn + n[:, 2])
    c = n[:, 0] * n[:, 1] * a
    t = np.stack([1.0 + sgn * n[:, 0] ** 2 * a, sgn * c, -sgn * n[:, 0]], axis=1)
    b = np.stack([c, sgn + n[:, 1] ** 2 * a, -n[:, 1]], axis=1)
    return x[:, None] * t + y[:, None] * b + z[:, None] * n


def _around(axis, cos_t, u):
    sin_t = np.sqrt(np.maximum(0.0, 1.0 - cos_t * cos_t))
    phi = 2.0 * np.pi * u
    return _from_frame(axis, sin_t * np.cos(phi), sin_t * np.sin(phi), cos_t)


def _light_sample(sc: _Scene, kd, ks, e, x, n, r, u1, u2):
    """Direct light at x through one light-area sample, as in the kernel's light_sample."""
    if sc.sphere_light:
        # uniform on the hemisphere of the light that faces x
        ny = _around(_normalize(x - sc.light_at), u1, u2)
        y = sc.light_at + sc.light_radius * ny
        area = 2.0 * np.pi * sc.light_radius**2
    else:
        c = np.cross(sc.light_u, sc.light_v)
        area = np.linalg.norm(c)
        ny = np.broadcast_to(c / area, x.shape)
        y = sc.light_at + u1[:, None] * sc.light_u + u2[:, None] * sc.light_v
    to = y - x
    dist2 = _dot(to, to)
    dist = np.sqrt(dist2)
    wi = to / dist[:, None]
    cos_x, cos_y = _dot(n, wi), -_dot(ny, wi)
    lit = (cos_x > 0) & (cos_y > 0)
    lit &= ~sc.occluded(x + RAY_OFFSET * n, wi, dist * (1.0 - 1e-4))
    contrib = sc.radiance * _brdf(kd, ks, e, r, wi) * (cos_x * cos_y * area / dist2)[:, None]
    return np.where(lit[:, None], contrib, 0.0)


def _first_hit(sc: _Scene, width, height):
    """Albedo and facing normal of the first hit through each pixel centre: (3, H, W) each."""
    py, px = np.divmod(np.arange(width * height), width)
    d = sc.camera_ray(px + 0.5, py + 0.5, width, height)
    _, ids, normal = sc.intersect(np.broadcast_to(sc.eye, d.shape), d)
    hit = ids != HIT_NONE
    facing = np.where((_dot(normal, d) < 0)[:, None], normal, -normal)
    n = np.where(hit[:, None], facing, 0.0)
    surf = sc.surface_index(np.where(hit & (ids != HIT_LIGHT), ids, 0))
    a = sc.diffuse[surf] + sc.glossy[surf, :3]
    a = np.where((ids == HIT_LIGHT)[:, None], 1.0, np.where(hit[:, None], a, 0.0))
    return (v.T.reshape(3, height, width) for v in (a, n))


def _trace(sc: _Scene, seed, width, height, spp, bounces):
    """Mean radiance of `spp` paths per pixel: (3, H, W)."""
    count = width * height * spp
    pixel = np.repeat(np.arange(width * height, dtype=np.uint64), spp)
    sample = np.tile(np.arange(spp, dtype=np.uint64), width * height)
    py, px = np.divmod(pixel.astype(np.int64), width)
    key = sc.key.copy()
    key[0] = seed

    radiance = np.zeros((count, 3))
    weight = np.ones((count, 3))
    o = np.broadcast_to(sc.eye, (count, 3)).copy()
    d = np.zeros((count, 3))
    live = np.arange(count)  # paths still being traced
    for bounce in range(bounces):
        def words(k):
            c = np.stack([pixel[live], sample[live], np.full(len(live), bounce, np.uint64),
                          np.full(len(live), k, np.uint64)], axis=1)
            return philox4x32_10(c, key)
        r0, r1 = words(0), words(1)
        if bounce == 0:
            d = sc.camera_ray(px + _unit(r1[:, 1]), py + _unit(r1[:, 2]), width, height)
        t, ids, normal = sc.intersect(o[live], d)
        w = weight[live]

        miss, light = ids == HIT_NONE, ids == HIT_LIGHT
        radiance[live[miss]] += w[miss] * sc.sky
        if bounce == 0:
            seen = light & (_dot(normal, d) < 0)
            radiance[live[seen]] += sc.radiance
        on = ~miss & ~light
        live, r0, r1, t, ids, normal, w, d = (a[on] for a in (live, r0, r1, t, ids, normal, w, d))

        surf = sc.surface_index(ids)
        kd, ks, e = sc.diffuse[surf], sc.glossy[surf, :3], sc.glossy[surf, 3]
        n = np.where((_dot(normal, d) < 0)[:, None], normal, -normal)
        x = o[live] + t[:, None] * d
        r = d - 2.0 * _dot(n, d)[:, None] * n
        radiance[live] += w * _light_sample(sc, kd, ks, e, x, n, r, _unit(r0[:, 0]), _unit(r0[:, 1]))

        wd, ws = kd.mean(axis=1), ks.mean(axis=1)
        if bounce + 1 == bounces:
            break
        go = wd + ws > 0
        pd = np.where(go, wd / np.where(go, wd + ws, 1.0), 0.0)
        u2, u3 = _unit(r0[:, 2]), _unit(r0[:, 3])
        diffuse = _unit(r1[:, 0]) < pd
        wi = _normalize(np.where(diffuse[:, None], _around(n, np.sqrt(u2), u3), _around(r, u2 ** (1.0 / (e + 1.0)), u3)))
        cos_n = _dot(n, wi)
        pdf = pd * cos_n / np.pi + (1.0 - pd) * (e + 1.0) * (0.5 / np.pi) * np.maximum(_dot(r, wi), 0.0) ** e
        go &= (cos_n > 0) & (pdf > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            w = w * _brdf(kd, ks, e, r, wi) * (cos_n / pdf)[:, None]
        live, w, x, n, wi = (a[go] for a in (live, w, x, n, wi))
        weight[live] = w
        o[live] = x + RAY_OFFSET * n
        d = wi
    return radiance.reshape(height, width, spp, 3).mean(axis=2).transpose(2, 0, 1)


def render(scene, size, spp: int, seed: int = 0, bounces: int = 4) -> dict[str, np.ndarray]:
    """The float64 counterpart of `mlmetal.raytrace.render`: dict of (N, 3, H, W) arrays."""
    scenes = rt.scenes_of(scene)
    height, width = rt.image_size(size)
    out = {"rgb": [], "albedo": [], "normal": []}
    for s in scenes:
        sc = _Scene(s)
        out["rgb"].append(_trace(sc, seed, width, height, spp, bounces))
        a, n = _first_hit(sc, width, height)
        out["albedo"].append(a)
        out["normal"].append(n)
    return {k: np.stack(v) for k, v in out.items()}
