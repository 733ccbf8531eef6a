"""Procedural scenes and the path tracer that renders them (kernels/raytrace.metal).

The denoiser's training data: `random_scene(seed)` lays out a room with spheres and an area
light; `render(dev, scenes, size, spp, seed)` path-traces it on the device and returns the
noisy (few spp) or clean (many spp) colour together with the albedo and normal images of the
first hit. A render is a pure function of (scene, size, spp, seed, bounces): the same on every
backend up to float rounding, and matched by the float64 reference in
mlmetal/reference/raytrace.py.

Example:
    >>> import mlmetal as mm, mlmetal.raytrace as rt
    >>> dev = mm.device("cpu")
    >>> scenes = [rt.random_scene(s) for s in range(4)]
    >>> noisy = rt.render(dev, scenes, 64, spp=4, seed=1)
    >>> clean = rt.render(dev, scenes, 64, spp=256, seed=2)
    >>> noisy["rgb"].shape, noisy["albedo"].shape
    ((4, 3, 64, 64), (4, 3, 64, 64))
"""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache
from typing import Sequence

import numpy as np

from .runtime import source as S
from .tensor import Tensor, empty

__all__ = ["Light", "Camera", "Scene", "random_scene", "render", "MAX_SPHERES", "MAX_PLANES"]

LIGHT_SHAPES = ("rect", "sphere")  # the kernel's LIGHT_RECT, LIGHT_SPHERE
MAX_SIZE = 8192
MAX_SPP = 1 << 16
MAX_BOUNCES = 16
MAX_EXPONENT = 1000.0
_GROUP = (8, 8, 1)  # 64 threads: a square tile keeps neighbouring paths (and their cost) together


# ---------------------------------------------------------------- the kernel's scene struct

@lru_cache(maxsize=None)
def _layout() -> tuple[dict[str, tuple[int, int, int]], int]:
    """Row offsets of the kernel's `Scene` struct, parsed from kernels/raytrace.metal.

    Returns ({field: (first row, count, rows per element)}, rows per scene); a row is 4 words.
    """
    structs = S.Source.from_file(S.find("raytrace")).structs
    rows_of = {name: len(st.fields) for name, st in structs.items() if name != "Scene"}
    layout, row = {}, 0
    for f in structs["Scene"].fields:
        per = rows_of.get(f.type, 1)
        layout[f.name] = (row, f.count, per)
        row += f.count * per
    return layout, row


MAX_SPHERES = _layout()[0]["spheres"][1]
MAX_PLANES = _layout()[0]["planes"][1]


# ---------------------------------------------------------------- scene description

def _f32(a, shape: tuple[int, ...], what: str) -> np.ndarray:
    """`a` as a finite float32 array of `shape` (rounded once, so kernel and reference agree)."""
    arr = np.asarray(a, dtype=np.float64)
    if arr.shape != shape:
        raise ValueError(f"{what} must have shape {shape}, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} must be finite, got {arr}")
    return arr.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Light:
    """An area light: a one-sided rectangle shining towards u × v, or a sphere.

    Args:
        shape: "rect" or "sphere".
        position: the rectangle's corner or the sphere's centre.
        radiance: emitted radiance, rgb.
        u, v: the rectangle's edges (perpendicular); unused for a sphere.
        radius: the sphere's radius; unused for a rectangle.

    Example:
        >>> Light("rect", position=(-1, 4, -1), u=(2, 0, 0), v=(0, 0, 2), radiance=(12, 12, 11))
    """

    shape: str
    position: np.ndarray
    radiance: np.ndarray
    u: np.ndarray = (0.0, 0.0, 0.0)
    v: np.ndarray = (0.0, 0.0, 0.0)
    radius: float = 0.0

    def __post_init__(self):
        if self.shape not in LIGHT_SHAPES:
            raise ValueError(f"light shape must be one of {LIGHT_SHAPES}, got {self.shape!r}")
        for name in ("position", "radiance", "u", "v"):
            object.__setattr__(self, name, _f32(getattr(self, name), (3,), f"light {name}"))
        object.__setattr__(self, "radius", float(np.float32(self.radius)))
        if (self.radiance < 0).any():
            raise ValueError(f"light radiance must be non-negative, got {self.radiance}")
        if self.shape == "sphere" and not self.radius > 0:
            raise ValueError(f"a sphere light needs a positive radius, got {self.radius}")
        if self.shape == "rect":
            u, v = self.u.astype(np.float64), self.v.astype(np.float64)
            if np.linalg.norm(np.cross(u, v)) == 0:
                raise ValueError(f"a rectangle light needs two non-zero, non-parallel edges, got u={u}, v={v}")
            if abs(u @ v) > 1e-5 * np.linalg.norm(u) * np.linalg.norm(v):
                raise ValueError(f"a rectangle light's edges must be perpendicular, got u={u}, v={v}")


@dataclasses.dataclass(frozen=True)
class Camera:
    """A pinhole camera: eye, orthonormal (forward, right, up), vertical field of view in degrees.

    Example:
        >>> Camera.look_at(eye=(0, 1.5, 7), target=(0, 1, 0), fov=45)
    """

    eye: np.ndarray
    forward: np.ndarray
    right: np.ndarray
    up: np.ndarray
    fov: float

    def __post_init__(self):
        for name in ("eye", "forward", "right", "up"):
            object.__setattr__(self, name, _f32(getattr(self, name), (3,), f"camera {name}"))
        if not 0 < self.fov < 180:
            raise ValueError(f"camera fov must be in (0, 180) degrees, got {self.fov}")
        axes = np.stack([self.forward, self.right, self.up]).astype(np.float64)
        if np.abs(axes @ axes.T - np.eye(3)).max() > 1e-5:
            raise ValueError("camera forward, right and up must be orthonormal")

    @classmethod
    def look_at(cls, eye, target, fov: float, up=(0.0, 1.0, 0.0)) -> "Camera":
        """The camera at `eye` looking at `target`, with `up` roughly up."""
        eye, target = np.asarray(eye, np.float64), np.asarray(target, np.float64)
        forward = target - eye
        forward /= np.linalg.norm(forward)
        right = np.cross(forward, np.asarray(up, np.float64))
        if np.linalg.norm(right) < 1e-9:
            raise ValueError("camera up must not be parallel to the view direction")
        right /= np.linalg.norm(right)
        return cls(eye, forward, right, np.cross(right, forward), float(fov))

    @property
    def tan_half_fov(self) -> np.float32:
        """The image plane's half height at distance 1, in float32 as the kernel gets it."""
        return np.float32(math.tan(math.radians(self.fov) / 2))


@dataclasses.dataclass(frozen=True)
class Scene:
    """What the path tracer renders. Arrays are float32; surfaces list spheres first, then planes.

    Args:
        spheres: (S, 4) centre xyz and radius, S ≤ MAX_SPHERES.
        planes: (P, 4) unit normal xyz and offset d (the plane n·p = d), P ≤ MAX_PLANES.
        diffuse: (S + P, 3) Lambert albedo kd.
        glossy: (S + P, 4) Phong reflectance ks rgb and exponent; kd + ks ≤ 1 per channel.
        light: the area light.
        camera: the camera.
        sky: radiance of rays that leave the scene, rgb.
        seed: the scene's key word for the path tracer's random numbers.

    Example:
        >>> scene = random_scene(3); scene.spheres.shape
        (5, 4)
    """

    spheres: np.ndarray
    planes: np.ndarray
    diffuse: np.ndarray
    glossy: np.ndarray
    light: Light
    camera: Camera
    sky: np.ndarray = (0.0, 0.0, 0.0)
    seed: int = 0

    def __post_init__(self):
        ns, npl = len(np.asarray(self.spheres)), len(np.asarray(self.planes))
        if ns > MAX_SPHERES or npl > MAX_PLANES:
            raise ValueError(f"a scene holds at most {MAX_SPHERES} spheres and {MAX_PLANES} planes, got {ns} and {npl}")
        n = ns + npl
        for name, shape in (("spheres", (ns, 4)), ("planes", (npl, 4)), ("diffuse", (n, 3)),
                            ("glossy", (n, 4)), ("sky", (3,))):
            object.__setattr__(self, name, _f32(getattr(self, name), shape, f"scene {name}"))
        if not isinstance(self.light, Light) or not isinstance(self.camera, Camera):
            raise TypeError("scene light and camera must be a Light and a Camera")
        if not isinstance(self.seed, (int, np.integer)) or not 0 <= self.seed < 2**32:
            raise ValueError(f"scene seed must be an integer in [0, 2**32), got {self.seed!r}")
        if (self.spheres[:, 3] <= 0).any():
            raise ValueError(f"sphere radii must be positive, got {self.spheres[:, 3]}")
        if npl and np.abs(np.linalg.norm(self.planes[:, :3].astype(np.float64), axis=1) - 1).max() > 1e-5:
            raise ValueError("plane normals must be unit vectors")
        ks, e = self.glossy[:, :3], self.glossy[:, 3]
        if (self.diffuse < 0).any() or (ks < 0).any():
            raise ValueError("diffuse and glossy reflectances must be non-negative")
        if (self.diffuse + ks > 1 + 1e-6).any():
            raise ValueError("diffuse + glossy reflectance must be at most 1 per channel (energy conservation)")
        if not ((e >= 0) & (e <= MAX_EXPONENT)).all():
            raise ValueError(f"glossy exponents must be in [0, {MAX_EXPONENT}], got {e}")
        if (self.sky < 0).any():
            raise ValueError(f"sky radiance must be non-negative, got {self.sky}")

    def pack(self) -> np.ndarray:
        """The scene as the kernel's `Scene` struct: (rows, 4) float32 (uint words stored bitwise)."""
        layout, rows = _layout()
        out = np.zeros((rows, 4), np.float32)

        def put(name, value, index=0, part=0):
            row, _, per = layout[name]
            out[row + index * per + part, : len(value)] = value

        ns = len(self.spheres)
        out[layout["header"][0]].view(np.uint32)[:] = (ns, len(self.planes), LIGHT_SHAPES.index(self.light.shape), self.seed)
        put("sky", self.sky)
        for name in ("eye", "forward", "right", "up"):
            put(name, getattr(self.camera, name))
        put("view", [self.camera.tan_half_fov])
        put("light_at", self.light.position)
        put("light_u", self.light.u if self.light.shape == "rect" else [self.light.radius])
        put("light_v", self.light.v)
        put("radiance", self.light.radiance)
        for i, shape in enumerate(np.concatenate([self.spheres, self.planes])):
            field, k = ("spheres", i) if i < ns else ("planes", i - ns)
            put(field, shape, k, 0)
            put(field, self.diffuse[i], k, 1)
            put(field, self.glossy[i], k, 2)
        return out


# ---------------------------------------------------------------- random layouts

def _colour(rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    """A random colour: a random hue's rgb mixed with grey, scaled into [lo, hi]."""
    hue = rng.uniform(0, 1)
    rgb = np.clip(np.abs((hue * 6 + np.array([0, 4, 2])) % 6 - 3) - 1, 0, 1)
    rgb = rgb * rng.uniform(0.3, 1.0) + (1 - rgb) * rng.uniform(0.0, 0.4)  # desaturate
    return lo + (hi - lo) * rgb


def random_scene(seed: int) -> Scene:
    """A random room: floor, back wall and up to two side walls, 3–8 spheres, one area light.

    The light is a ceiling rectangle or a floating sphere; surfaces are diffuse, or about half
    of the spheres glossy too; the camera looks in from the open front. The same seed gives the
    same scene on every machine (numpy's PCG64).

    Args:
        seed: an integer in [0, 2**32); it is also the scene's noise key (`Scene.seed`).

    Example:
        >>> scene = random_scene(0); len(scene.spheres) <= MAX_SPHERES
        True
    """
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    rng = np.random.default_rng(int(seed))
    half, back = rng.uniform(3.0, 5.0), rng.uniform(3.5, 6.0)
    planes = [(0, 1, 0, 0), (0, 0, 1, -back)]
    diffuse = [_colour(rng, 0.5, 0.8), _colour(rng, 0.4, 0.8)]
    glossy = [(0.0, 0.0, 0.0, 1.0), (0.0, 0.0, 0.0, 1.0)]
    for side in (1, -1):  # left wall faces +x, right wall −x
        if rng.uniform() < 0.7:
            planes.append((side, 0, 0, -half))
            diffuse.append(_colour(rng, 0.2, 0.8))
            glossy.append((0.0, 0.0, 0.0, 1.0))

    spheres, s_diffuse, s_glossy = [], [], []
    count = rng.integers(3, MAX_SPHERES + 1)
    for _ in range(200):  # rejection sampling of non-overlapping spheres
        if len(spheres) == count:
            break
        r = rng.uniform(0.3, 1.1)
        lift = rng.uniform(0.3, 0.8) if rng.uniform() < 0.2 else 0.0  # tops stay below 3, under the lights
        c = np.array([rng.uniform(-half + r, half - r), r + lift, rng.uniform(-back + r, 2.0)])
        if any(np.linalg.norm(c - s[:3]) < r + s[3] + 0.05 for s in spheres):
            continue
        spheres.append(np.array([*c, r]))
        if rng.uniform() < 0.5:
            ks = rng.uniform(0.05, 0.5) * (np.ones(3) if rng.uniform() < 0.7 else _colour(rng, 0.3, 1.0))
            exponent = float(np.exp(rng.uniform(np.log(8), np.log(200))))
        else:
            ks, exponent = np.zeros(3), 1.0
        s_diffuse.append(_colour(rng, 0.1, 0.9) * (1 - ks))
        s_glossy.append((*ks, exponent))

    power = rng.uniform(40, 70)  # radiance × area that faces the room: keeps the floor near 0.5
    tint = 1 - 0.25 * rng.uniform(0, 1, 3)
    if rng.uniform() < 0.6:
        sx, sz = rng.uniform(1.0, 2.5, 2)
        cx, cz = rng.uniform(-half / 2, half / 2), rng.uniform(-back + 1.5, 1.0)
        light = Light("rect", position=(cx - sx / 2, rng.uniform(4.0, 5.5), cz - sz / 2), u=(sx, 0, 0), v=(0, 0, sz),
                      radiance=tint * power / (sx * sz))
    else:
        radius = rng.uniform(0.25, 0.6)
        centre = (rng.uniform(-half / 2, half / 2), rng.uniform(3.7, 4.8), rng.uniform(-back + 1.5, 1.0))
        light = Light("sphere", position=centre, radius=radius, radiance=tint * power / (np.pi * radius * radius))

    eye = (rng.uniform(-1.0, 1.0), rng.uniform(1.2, 2.5), rng.uniform(6.0, 8.0))
    camera = Camera.look_at(eye, target=(rng.uniform(-0.5, 0.5), rng.uniform(0.6, 1.2), 0.0), fov=rng.uniform(40, 55))
    return Scene(spheres=np.array(spheres).reshape(-1, 4), planes=np.array(planes, np.float64),
                 diffuse=np.array(s_diffuse + diffuse).reshape(-1, 3), glossy=np.array(s_glossy + glossy).reshape(-1, 4),
                 light=light, camera=camera, sky=_colour(rng, 0.05, 0.25) * np.array([0.8, 0.9, 1.2]), seed=int(seed))


# ---------------------------------------------------------------- rendering

def image_size(size) -> tuple[int, int]:
    """(height, width) from an int or a pair, with a clear error for anything else."""
    pair = (size, size) if isinstance(size, (int, np.integer)) and not isinstance(size, bool) else size
    try:
        h, w = pair
    except (TypeError, ValueError):
        raise ValueError(f"size must be an int or a (height, width) pair, got {size!r}") from None
    for v in (h, w):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or not 1 <= v <= MAX_SIZE:
            raise ValueError(f"image height and width must be integers in [1, {MAX_SIZE}], got {size!r}")
    return int(h), int(w)


def _check_count(what: str, v, hi: int) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or not 1 <= v <= hi:
        raise ValueError(f"{what} must be an integer in [1, {hi}], got {v!r}")
    return int(v)


def scenes_of(scene) -> list[Scene]:
    """A scene or a non-empty sequence of scenes, as a list."""
    scenes = [scene] if isinstance(scene, Scene) else list(scene)
    if not scenes or not all(isinstance(s, Scene) for s in scenes):
        raise TypeError("expected a Scene or a non-empty sequence of Scenes")
    return scenes


def render(dev, scene: Scene | Sequence[Scene], size, spp: int, seed: int = 0, bounces: int = 4) -> dict[str, Tensor]:
    """Path-trace scenes on the device: colour at `spp` samples per pixel, albedo and normals.

    The images are (N, 3, H, W) float32 tensors: `rgb` is linear radiance (the light itself is
    far brighter than 1: clip or tone-map for display); `albedo` (kd + ks) and `normal` (unit,
    world space, facing the camera) are those of the first hit through each pixel's centre, so
    they are noise-free and the same at any spp; pixels that see only sky have zeros. Work is
    committed and not waited for: reading a tensor waits.

    Args:
        dev: the device.
        scene: a Scene or a sequence of them (one image each).
        size: an int for square images, or (height, width).
        spp: paths per pixel, 1 to 65536: a few for the noisy input, hundreds for the target.
        seed: the noise seed, 0 to 2**32 − 1; render the clean target with a different seed
            from the noisy input so their noise is independent.
        bounces: path vertices, 1 (direct light only) to 16.

    Example:
        >>> out = render(mm.device("cpu"), random_scene(0), (48, 64), spp=4, seed=1)
        >>> out["rgb"].shape
        (1, 3, 48, 64)
    """
    scenes = scenes_of(scene)
    h, w = image_size(size)
    spp = _check_count("spp", spp, MAX_SPP)
    bounces = _check_count("bounces", bounces, MAX_BOUNCES)
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if len(scenes) * h * w * 3 >= 2**32:
        raise ValueError(f"{len(scenes)} images of {h}×{w} are too many for the kernel's 32-bit indices")

    shape = (len(scenes), 3, h, w)
    out = {name: empty(shape, dev) for name in ("rgb", "albedo", "normal")}
    packed = dev.buffer(np.stack([s.pack() for s in scenes]))
    params = {"width": w, "height": h, "scenes": len(scenes), "spp": spp, "bounces": bounces, "seed": int(seed)}
    groups = (-(-w // _GROUP[0]), -(-h // _GROUP[1]), len(scenes))
    cb = dev.command_buffer()
    cb.dispatch(dev.library("raytrace").kernel("raytrace"), groups, _GROUP,
                [out["rgb"], out["albedo"], out["normal"], packed, params])
    cb.commit()
    return out
