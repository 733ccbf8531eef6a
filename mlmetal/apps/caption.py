"""Early-exit decoding: a CNN encoder and an LSTM decoder that spell the digit in an image.

The talk's image-captioning network in small: scikit-learn's handwritten digits in, the
digit's name out, letter by letter ("seven", then an end token). Everything is graph ops —
the encoder's convolutions, and per decoding step an embedding gather, an LSTM cell from
linear, sigmoid, tanh, mul and add, the output linear and an arg-max.

Training unrolls the decoder over the longest name with teacher forcing (the true previous
letter goes in). Decoding unrolls it over up to 20 steps, all encoded before the host waits
once; predication makes the device stop early: each step also updates per-sequence
"running" flags (`still_running`) and writes `predicate_any(running)` into a predicate word
that predicates every later step. Once every sequence has emitted the end token the word is
0 and the device skips the remaining steps, so decoding costs what the names need rather
than the 20-step maximum.

Images are the digits' own 8×8 by default; a larger size (a multiple of 8) upscales them
bilinearly, and the encoder's features grow with it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

import mlmetal as mm
from mlmetal.apps.digits import load_digits, upscale
from mlmetal.cli import announce_autocast, autocast_note, integer, loss_scaler, number
from mlmetal.ops.predicate import Predicates

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
END, START = 0, 1
LETTERS = sorted(set("".join(NAMES)))
VOCAB = ["<end>", "<start>"] + LETTERS
TOKEN = {ch: i for i, ch in enumerate(VOCAB)}
STEPS = max(len(n) for n in NAMES) + 1  # teacher-forced steps: the longest name and its end token


def spell(digit: int) -> list[int]:
    """The tokens of a digit's name followed by the end token, padded with end tokens to STEPS."""
    tokens = [TOKEN[ch] for ch in NAMES[digit]] + [END]
    return tokens + [END] * (STEPS - len(tokens))


def read(tokens) -> str:
    """The letters before the first end token."""
    out = []
    for t in tokens:
        if t == END:
            break
        out.append(VOCAB[t] if 0 <= t < len(VOCAB) else "?")
    return "".join(out)


class Captioner(mm.nn.Module):
    """CNN encoder (two conv+ReLU+max-pool stages) and an LSTM decoder conditioned on its features.

    The image enters every step through the gates (a fixed per-image term added to the
    input and recurrent terms), so the decoder never has to carry it in its state.

    Args:
        device: where the parameters live.
        width: channels of the first convolution (the second has twice as many).
        hidden: LSTM state size.
        embed: token embedding size.
        size: image side, a multiple of 8.
    """

    def __init__(self, device=None, width: int = 16, hidden: int = 48, embed: int = 16, size: int = 8):
        if size < 8 or size % 8:
            raise ValueError(f"size must be a multiple of 8, got {size}")
        self.hidden, self.size = hidden, size
        self.encoder = mm.nn.Sequential(
            mm.nn.Conv2d(1, width, 3, padding=1, device=device), mm.nn.ReLU(), mm.nn.MaxPool2d(2),
            mm.nn.Conv2d(width, 2 * width, 3, padding=1, device=device), mm.nn.ReLU(), mm.nn.MaxPool2d(2))
        self.image_gates = mm.nn.Linear(2 * width * (size // 4) ** 2, 4 * hidden, device=device)
        self.embedding = mm.nn.Parameter(
            np.random.default_rng(0).uniform(-0.5, 0.5, (len(VOCAB), embed)).astype(np.float32), device)
        self.input_gates = mm.nn.Linear(embed, 4 * hidden, device=device)
        self.hidden_gates = mm.nn.Linear(hidden, 4 * hidden, bias=False, device=device)
        self.output = mm.nn.Linear(hidden, len(VOCAB), device=device)

    def context(self, images):
        """The per-image term of the gates, (N, 4·hidden)."""
        features = self.encoder(images)
        return self.image_gates(features.flatten(1))

    def step(self, token, state, context):
        """One LSTM step from the previous token; returns (logits, (h, c)). `state` None starts from zeros."""
        gates = self.input_gates(mm.ops.embedding(token, self.embedding)) + context
        if state is not None:
            gates = gates + self.hidden_gates(state[0])
        H = self.hidden
        i, f, o = (mm.ops.sigmoid(mm.ops.slice_channels(gates, a * H, (a + 1) * H)) for a in (0, 1, 3))
        g = mm.ops.tanh(mm.ops.slice_channels(gates, 2 * H, 3 * H))
        c = i * g if state is None else f * state[1] + i * g
        h = o * c.tanh()
        return self.output(h), (h, c)


def training_graph(net: Captioner, dev, batch: int, lr: float, autocast=None):
    """Teacher forcing over STEPS steps: inputs images, in0…, target0… (one-hot); the loss sums the steps.
    `autocast` ("bfloat16", "float16" or None) is the graph's compute_dtype (mm.autocast)."""
    g = mm.Graph(dev, compute_dtype=autocast)
    images = g.input("images", (batch, 1, net.size, net.size))
    context = net.context(images)
    state, loss = None, None
    for t in range(STEPS):
        logits, state = net.step(g.input(f"in{t}", (batch,), np.int32), state, context)
        target = g.input(f"target{t}", (batch, len(VOCAB)))
        step_loss = mm.ops.softmax_cross_entropy_loss(logits, target, reduction="mean")
        loss = step_loss if loss is None else loss + step_loss
    return loss.training_graph(optimizer=mm.optim.Adam(net.parameters(), lr=lr), loss_scaler=loss_scaler(autocast, dev))


class Decoder:
    """Greedy decoding of up to `max_len` steps in one graph run, optionally stopped early by a predicate.

    Args:
        net: a trained Captioner.
        dev: the device.
        batch: images per run.
        max_len: decoding steps encoded.
        predicated: predicate every step by "some sequence is still running"; False runs all steps.

    Example:
        >>> words = Decoder(net, dev, batch=len(x)).decode(x)   # ['seven', 'two', ...]
    """

    def __init__(self, net: Captioner, dev, batch: int, max_len: int = 20, predicated: bool = True):
        self.batch, self.max_len = batch, max_len
        self.flags = Predicates(dev, 1)
        g = self.graph = mm.Graph(dev)
        images = g.input("images", (batch, 1, net.size, net.size))
        token = g.input("start", (batch,), np.int32)
        running = g.input("running", (batch,), np.uint32)
        self.flags.set(0, 1, graph=g)  # every run starts with the word on
        context = net.context(images)
        state, self.tokens = None, []
        for _ in range(max_len):
            with g.predicated(self.flags[0]) if predicated else _unpredicated():
                logits, state = net.step(token, state, context)
                token = mm.ops.argmax(logits)
                running = mm.ops.still_running(token, running, end=END)
                self.flags.any(0, running)  # 0 once every sequence has ended: the steps after are skipped
            self.tokens.append(token)

    def run(self, images: np.ndarray, commit_every: int = 16) -> np.ndarray:
        """The tokens of every step, (max_len, batch); entries after a sequence's end token are undefined."""
        n = self.batch
        feed = {"images": images, "start": np.full(n, START, np.int32), "running": np.ones(n, np.uint32)}
        return np.stack(self.graph.run(feed, outputs=self.tokens, commit_every=commit_every))

    def decode(self, images: np.ndarray) -> list[str]:
        """The name spelled for each image (the letters before its first end token)."""
        return [read(seq) for seq in self.run(images).T]


class _unpredicated:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def train_caption(device=None, epochs: int = 15, batch: int = 64, lr: float = 1e-2, seed: int = 0,
                  progress: bool = True, limit: int | None = None, steps: int | None = None, size: int = 8,
                  autocast=None) -> dict:
    """Train a Captioner by teacher forcing with Adam; returns {'accuracy', 'history', 'net', 'device',
    'test' (held-out images and labels), 'steps', 'interrupted'}.

    Ctrl-C stops training early and returns what was learnt so far (`interrupted` is True,
    `history` is empty and `accuracy` is measured then).

    Args:
        device: a Device or backend name.
        epochs: passes over the training digits.
        batch: digits per step.
        lr: Adam's learning rate (halved every third of the epochs).
        seed: initialisation and shuffling.
        progress: show a progress bar.
        limit: train on only the first `limit` training digits (quick tests).
        steps: stop after this many training steps in all (default: every epoch).
        size: image side, a multiple of 8: the digits' own 8, or them upscaled bilinearly.
        autocast: None, or "bfloat16" / "float16" to build the training graph under `mm.autocast`
            (decoding runs in float32).

    Example:
        >>> result = train_caption("cpu", epochs=15); result["accuracy"]   # held-out digits spelled right
    """
    dev = mm.device(device) if not isinstance(device, mm.Device) else device
    mm.nn.seed(seed)
    x_tr, y_tr, x_te, y_te = load_digits(seed)
    if limit is not None:
        x_tr, y_tr = x_tr[:limit], y_tr[:limit]
    net = Captioner(dev, size=size)
    x_tr, x_te = upscale(x_tr, size, dev), upscale(x_te, size, dev)
    train = training_graph(net, dev, batch, lr, autocast)
    schedule = mm.optim.StepDecay(train.optimizer, every=max(1, epochs // 3))
    decoder = Decoder(net, dev, len(x_te))
    spelled = np.array([spell(d) for d in range(10)], np.int32)
    eye = np.eye(len(VOCAB), dtype=np.float32)
    rng = np.random.default_rng(seed)

    def batches(epoch):
        order = rng.permutation(len(x_tr))
        for k in range(0, len(order) - batch + 1, batch):
            idx = order[k:k + batch]
            words = spelled[y_tr[idx]]  # (batch, STEPS): the targets; the inputs are them shifted by one
            inputs = np.concatenate([np.full((batch, 1), START, np.int32), words[:, :-1]], axis=1)
            feed = {"images": x_tr[idx]}
            for t in range(STEPS):
                feed[f"in{t}"] = inputs[:, t]
                feed[f"target{t}"] = eye[words[:, t]]
            yield feed

    def validate():
        got = decoder.decode(x_te)
        return {"accuracy": float(np.mean([w == NAMES[d] for w, d in zip(got, y_te)]))}

    step_losses: list[float] = []  # kept here rather than from fit's history, which Ctrl-C would lose

    def step(**feed):
        step_losses.append(train.step(**feed))
        return step_losses[-1]

    history, interrupted = [], False
    try:
        history = mm.train.fit(step, batches, epochs, validate=validate, every=5, schedule=schedule,
                               progress=progress, steps=steps)
    except KeyboardInterrupt:
        interrupted = True
    accuracy = history[-1]["accuracy"] if history else validate()["accuracy"]
    return {"accuracy": accuracy, "history": history, "net": net, "device": dev, "test": (x_te, y_te),
            "steps": len(step_losses), "interrupted": interrupted}


COMMAND = "caption"
HELP = "train the digit captioner and decode with early exit by predication"
FLAGS = dict(out="caption-out", size=8, size_help="image side, a multiple of 8: 8 (the digits' own) or larger to train "
                                                 "on them upscaled bilinearly")


def add_arguments(p) -> None:
    p.add_argument("--epochs", type=integer(1), default=15, help="passes over the training digits (default 15)")
    p.add_argument("--batch", type=integer(1, 1347), default=64,
                   help="digits per training step, at most the 1347 training digits (default 64)")
    p.add_argument("--lr", type=number(0, above=True), default=1e-2,
                   help="Adam's learning rate, halved every third of the epochs (default 0.01)")


def check_arguments(args) -> str | None:
    """What the flags' types cannot see alone."""
    return None if args.size % 8 == 0 else f"argument --size: expected a multiple of 8, got {args.size}"


def run(args) -> int:
    """Train, save the weights, decode the held-out digits with early exit and write a report.

    Returns 0, or 130 when Ctrl-C cut training short (what was learnt is still saved and reported).
    """
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    announce_autocast(args)
    result = train_caption(args.device, epochs=args.epochs, batch=args.batch, lr=args.lr, seed=args.seed,
                           progress=args.progress, steps=args.steps, size=args.size, autocast=args.autocast)
    if result["interrupted"]:
        print(f"interrupted after {result['steps']} steps: saving and reporting what was learnt", file=sys.stderr)
    net, (x_te, y_te) = result["net"], result["test"]
    net.save_weights(out / "captioner.zip")
    words = Decoder(net, result["device"], len(x_te)).decode(x_te)
    right = np.array([w == NAMES[d] for w, d in zip(words, y_te)])
    wrong = [f"{NAMES[d]} -> {w!r}" for w, d, ok in zip(words, y_te, right) if not ok]
    report = [f"{right.mean():.1%} of {len(y_te)} held-out digits spelled right after {result['steps']} steps "
              f"({'interrupted' if result['interrupted'] else 'done'}) on {result['device'].name}"
              f"{autocast_note(args)}, "
              f"images {args.size}×{args.size}",
              "per digit: " + ", ".join(f"{NAMES[d]} {right[y_te == d].mean():.0%}" for d in range(10)),
              f"misspelled ({len(wrong)}): " + "; ".join(wrong[:20]) + (" …" if len(wrong) > 20 else "")]
    (out / "report.txt").write_text("\n".join(report) + "\n")
    print(f"{report[0]} in {time.perf_counter() - t0:.0f} s; e.g. {', '.join(words[:8])}")
    print(f"wrote {out / 'captioner.zip'} and {out / 'report.txt'}")
    return 130 if result["interrupted"] else 0
