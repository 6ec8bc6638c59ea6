"""A small machining simulator: G-code program -> sensor log of a virtual 3-axis mill.

The machine executes each line with a trapezoidal velocity profile (acceleration limit, exact stop at the end
of every move, as with G61), rapid moves at `rapid_mm_min`, feed moves at the programmed F, G2/G3 arcs from R or
I/J/K in the active plane (`arc_path`), and canned cycles G73 G74 G81-G86 G89 with G98/G99 as LinuxCNC runs them
(`cycle_moves`); `Machine` keeps position, feed, spindle, coolant and a cycle series' initial level between lines.
A move of an axis the mill lacks (rotary A/B/C, U/V/W; they stay at 0) is refused with a reason (`MachineError`).
Sensors see the true motion with per-group delay (samples) and Gaussian noise; cutting load appears when the tool
is below the stock top (Z < 0) on a feed move.

Continuous channels (C = 27; names and units in `CHANNELS`, groups in `CHANNEL_GROUPS`):

    position        actual_x/y/z            mm      servo lag 2 samples, encoder noise 2 um
    controller      command_x/y/z           mm      interpolator output
                    dtg_x/y/z               mm      distance to go to the line's end point (LinuxCNC `dtg`)
                    feed_command            mm/min  programmed (modal) feed F, also during G0 rapids
                    spindle_command         rpm
    velocity        velocity_x/y/z          mm/s
    acceleration    acceleration_x/y/z      mm/s^2
    spindle         spindle_speed           rpm     actual, lag 3 samples, 0.5 % noise
                    spindle_current         A       idle + cutting load
    motor_current   current_x/y/z           A       inertia * acceleration + friction + cutting force
    proximity       proximity               mm      tool tip height above the stock top, 0..10 mm range
    pressure        coolant_pressure        bar     coolant on while cutting ops run, rises with load
    accelerometer   vibration_x/y/z         g       spindle-frequency vibration scaled by load + noise

Categorical channels (4, three values each): motion_mode (0 rapid/idle, 1 linear feed, 2 arc),
spindle_state (0 off, 1 cw, 2 ccw), coolant (0 off, 1 mist, 2 flood), motion_phase (0 still, 1 accelerating,
2 cruising or decelerating).

Input groups (`INPUT_GROUPS`, recorded in every NPZ as `channel_groups` and chosen with `data.channel_groups`):
measured_motion (actual position, velocity, acceleration, proximity; categorical motion_phase), drives (axis motor
currents), spindle (actual speed and current; spindle_state), process (vibration, coolant pressure; coolant) and
commanded (the controller's setpoints: command position, distance to go, feed and spindle commands; categorical
motion_mode, which is the programmed G0/G1/G2-G3). The first four are what sensors on a machine measure; commanded
channels state the answer (command + dtg = the line's end point, feed_command = F).

Programs are generated inside the original's vocabulary (G0 G1 G3 G53 M30; X Y Z R F): nine operation types, each
with its own motion pattern. By default (`grid_mm=0`) coordinates and feature sizes are continuous, written with 3
decimals, and feeds are drawn from each operation's continuous range with one decimal, as CAM output is; `grid_mm>0`
snaps XY to that grid (and Z to 0.5 mm, feeds to 100 mm/min). Each cutting operation of a
program runs at a spindle speed drawn from one shared range (`SPINDLE_RPM_RANGE`), so the speed does not name the
operation. F is written on every feed line (the "always output feed" post option).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cnc_gcode.gcode import ModalState, ParsedLine, parse_line

OPERATIONS = ("approach", "face_mill", "pocket", "contour", "circular_pocket", "drill", "slot", "engrave",
              "retract_end")
N_OPERATIONS = len(OPERATIONS)
CHANNELS = (
    "actual_x", "actual_y", "actual_z", "command_x", "command_y", "command_z", "dtg_x", "dtg_y", "dtg_z",
    "feed_command", "spindle_command", "velocity_x", "velocity_y", "velocity_z", "acceleration_x",
    "acceleration_y", "acceleration_z", "spindle_speed", "spindle_current", "current_x", "current_y",
    "current_z", "proximity", "coolant_pressure", "vibration_x", "vibration_y", "vibration_z",
)
CHANNEL_GROUPS = {
    "position": ("actual_x", "actual_y", "actual_z"),
    "controller": ("command_x", "command_y", "command_z", "dtg_x", "dtg_y", "dtg_z", "feed_command",
                   "spindle_command"),
    "velocity": ("velocity_x", "velocity_y", "velocity_z"),
    "acceleration": ("acceleration_x", "acceleration_y", "acceleration_z"),
    "spindle": ("spindle_speed", "spindle_current"),
    "motor_current": ("current_x", "current_y", "current_z"),
    "proximity": ("proximity",),
    "pressure": ("coolant_pressure",),
    "accelerometer": ("vibration_x", "vibration_y", "vibration_z"),
}
CATEGORICAL_CHANNELS = ("motion_mode", "spindle_state", "coolant", "motion_phase")
CATEGORICAL_DIMS = (3, 3, 3, 3)
# Input groups a config chooses from (data.channel_groups): each continuous and categorical channel is in exactly
# one. Only `commanded` holds controller setpoints; the others are what sensors measure.
INPUT_GROUPS = {
    "measured_motion": ("actual_x", "actual_y", "actual_z", "velocity_x", "velocity_y", "velocity_z",
                        "acceleration_x", "acceleration_y", "acceleration_z", "proximity", "motion_phase"),
    "drives": ("current_x", "current_y", "current_z"),
    "spindle": ("spindle_speed", "spindle_current", "spindle_state"),
    "process": ("vibration_x", "vibration_y", "vibration_z", "coolant_pressure", "coolant"),
    "commanded": ("command_x", "command_y", "command_z", "dtg_x", "dtg_y", "dtg_z", "feed_command",
                  "spindle_command", "motion_mode"),
}
# NPZ keys under which every simulator file records its categorical channel names and input groups.
CHANNEL_GROUPS_KEY, CATEGORICAL_NAMES_KEY = "channel_groups", "categorical_names"
MEASURED_GROUPS = ("measured_motion", "drives", "spindle", "process")
# Spindle speeds (rpm) of generated programs: each cutting operation draws its own from this one range;
# approach/retract run with the spindle of the next/last operation.
SPINDLE_RPM_RANGE = (2000.0, 15000.0)
STOCK_TOP_MM = 0.0
Z_GRID_MM = 0.5
PROXIMITY_RANGE_MM = 10.0


@dataclass
class MachineConfig:
    dt_s: float = 0.02
    rapid_mm_min: float = 6000.0
    accel_mm_s2: float = 800.0
    dwell_s: float = 0.3
    seed: int = 0


@dataclass
class Segment:
    """One executed line: its samples' commanded positions [S, 3] and context.

    target: the end point of the move being interpolated, [3] or per sample [S, 3] (a canned cycle is several
    moves: distance-to-go counts to the end of each). mode: 0 rapid/still, 1 linear feed, 2 arc; int or [S].
    spindle_rpm / coolant: set by `execute` from the program's S, M3/M4/M5 and M7/M8/M9 words (None when the
    program never states them, as in generated programs: then `record` uses each operation's tool).
    """

    command_xyz: np.ndarray
    target: np.ndarray
    feed_mm_min: float
    mode: int | np.ndarray
    line_index: int
    spindle_rpm: float | None = None
    coolant: int | None = None


# ------------------------------------------------------------------------------------------------ programs ----
def _fmt(value: float) -> str:
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


class ProgramWriter:
    """Builds G-code lines while tracking position, so each line only states the axes that change."""

    def __init__(self, rng: np.random.Generator, grid_mm: float) -> None:
        self.rng, self.grid = rng, grid_mm
        self.lines: list[str] = []
        self.ops: list[int] = []
        self.pos = np.array([0.0, 0.0, 10.0])

    def snap(self, value: float) -> float:
        """XY coordinates and feature sizes: on the program's grid, or (grid 0) continuous with 3 decimals."""
        if self.grid <= 0:
            return round(float(value), 3)
        return round(round(value / self.grid) * self.grid, 3)

    def snap_z(self, value: float) -> float:
        if self.grid <= 0:
            return round(float(value), 3)
        return round(round(value / Z_GRID_MM) * Z_GRID_MM, 3)

    def feed(self, low: float, high: float) -> float:
        """A feed from the operation's range: continuous with one decimal, or (on a grid) a multiple of 100."""
        if self.grid <= 0:
            return round(float(self.rng.uniform(low, high)), 1)
        return _feed(self.rng, low, high)

    def radius(self, choices: list[float]) -> float:
        """Arc radius: a multiple of the grid, or (grid 0) continuous in the same span."""
        if self.grid <= 0:
            return round(float(self.rng.uniform(0.8 * min(choices), max(choices) * 2.5)), 3)
        return float(self.rng.choice(choices)) * max(self.grid, 2.5)

    def move(self, op: str, code: str, x=None, y=None, z=None, feed=None, radius=None) -> None:
        target = self.pos.copy()
        words = [code]
        for axis, value in enumerate((x, y, z)):
            if value is not None and abs(value - self.pos[axis]) > 1e-9:
                words.append(f"{'XYZ'[axis]}{_fmt(value)}")
                target[axis] = value
        if len(words) == 1:
            return
        if radius is not None:
            words.append(f"R{_fmt(radius)}")
        if feed is not None:
            words.append(f"F{_fmt(feed)}")
        self.lines.append(" ".join(words))
        self.ops.append(OPERATIONS.index(op))
        self.pos = target

    def raw(self, op: str, text: str) -> None:
        self.lines.append(text)
        self.ops.append(OPERATIONS.index(op))


def _feed(rng, low, high, step=100.0) -> float:
    return float(rng.integers(int(low / step), int(high / step) + 1) * step)


def _op_face(w: ProgramWriter, cx, cy, depth, feed):
    width, height, step = w.snap(w.rng.uniform(15, 35)), w.snap(w.rng.uniform(10, 25)), max(w.grid, w.snap(w.rng.uniform(3, 6)))
    x0, y0 = w.snap(cx - width / 2), w.snap(cy - height / 2)
    w.move("face_mill", "G1", z=depth, feed=feed)
    y, direction = y0, 1
    while y <= y0 + height:
        w.move("face_mill", "G1", x=x0 + width if direction > 0 else x0, y=y, feed=feed)
        y, direction = w.snap(y + step), -direction


def _op_pocket(w: ProgramWriter, cx, cy, depth, feed):
    half_w, half_h = w.snap(w.rng.uniform(6, 15)), w.snap(w.rng.uniform(5, 12))
    step = max(w.grid, w.snap(w.rng.uniform(2, 4)))
    w.move("pocket", "G1", z=depth, feed=feed)
    while half_w > 0 and half_h > 0:
        for x, y in ((cx + half_w, cy - half_h), (cx + half_w, cy + half_h), (cx - half_w, cy + half_h),
                     (cx - half_w, cy - half_h)):
            w.move("pocket", "G1", x=w.snap(x), y=w.snap(y), feed=feed)
        half_w, half_h = w.snap(half_w - step), w.snap(half_h - step)


def _op_contour(w: ProgramWriter, cx, cy, depth, feed):
    half_w, half_h = w.snap(w.rng.uniform(8, 20)), w.snap(w.rng.uniform(6, 15))
    r = w.radius([1.0, 2.0])
    w.move("contour", "G1", x=cx - half_w + r, y=cy - half_h, feed=feed)
    w.move("contour", "G1", z=depth, feed=feed)
    corners = [((cx + half_w - r, cy - half_h), (cx + half_w, cy - half_h + r)),
               ((cx + half_w, cy + half_h - r), (cx + half_w - r, cy + half_h)),
               ((cx - half_w + r, cy + half_h), (cx - half_w, cy + half_h - r)),
               ((cx - half_w, cy - half_h + r), (cx - half_w + r, cy - half_h))]
    for (lx, ly), (ax, ay) in corners:
        w.move("contour", "G1", x=lx, y=ly, feed=feed)
        w.move("contour", "G3", x=ax, y=ay, radius=r, feed=feed)


def _op_circular(w: ProgramWriter, cx, cy, depth, feed):
    radius = w.radius([1.0, 2.0, 3.0, 4.0])
    w.move("circular_pocket", "G1", x=cx + radius, y=cy, feed=feed)
    w.move("circular_pocket", "G1", z=depth, feed=feed)
    for _ in range(int(w.rng.integers(1, 3))):
        w.move("circular_pocket", "G3", x=cx - radius, y=cy, radius=radius, feed=feed)
        w.move("circular_pocket", "G3", x=cx + radius, y=cy, radius=radius, feed=feed)


def _op_drill(w: ProgramWriter, cx, cy, depth, feed):
    for _ in range(int(w.rng.integers(2, 5))):
        x, y = w.snap(cx + w.rng.uniform(-15, 15)), w.snap(cy + w.rng.uniform(-15, 15))
        w.move("drill", "G0", x=x, y=y)
        w.move("drill", "G0", z=2.0)
        w.move("drill", "G1", z=depth * 2, feed=feed)
        w.move("drill", "G0", z=5.0)


def _op_slot(w: ProgramWriter, cx, cy, depth, feed):
    length = w.snap(w.rng.uniform(15, 40))
    x0, x1 = w.snap(cx - length / 2), w.snap(cx + length / 2)
    w.move("slot", "G1", x=x0, y=cy, feed=feed)
    z, forward = 0.0, True
    while z > depth + 1e-9:
        z = max(w.snap_z(z - 1.0), depth)
        w.move("slot", "G1", z=z, feed=feed / 2)
        w.move("slot", "G1", x=x1 if forward else x0, feed=feed)
        forward = not forward


def _op_engrave(w: ProgramWriter, cx, cy, depth, feed):
    w.move("engrave", "G1", z=-0.5, feed=feed)
    for _ in range(int(w.rng.integers(4, 9))):
        w.move("engrave", "G1", x=w.snap(cx + w.rng.uniform(-8, 8)), y=w.snap(cy + w.rng.uniform(-8, 8)), feed=feed)


OP_WRITERS = {"face_mill": (_op_face, (-1.0, -0.5), (800, 2000)), "pocket": (_op_pocket, (-4.0, -2.0), (500, 1200)),
              "contour": (_op_contour, (-5.0, -2.0), (400, 1000)),
              "circular_pocket": (_op_circular, (-3.0, -1.0), (300, 900)),
              "drill": (_op_drill, (-3.0, -1.5), (100, 300)), "slot": (_op_slot, (-4.0, -2.0), (300, 800)),
              "engrave": (_op_engrave, (-0.5, -0.5), (200, 600))}
CUTTING_OPS = tuple(OP_WRITERS)


def generate_program(rng: np.random.Generator, kind: str, n_ops: int = 3, grid_mm: float = 0.0) -> tuple[list[str], list[int]]:
    """A random program whose first cutting operation is `kind`. Returns (lines, operation index per line)."""
    w = ProgramWriter(rng, grid_mm)
    w.raw("approach", "G53 G0 Z0")
    ops = [kind] + [str(o) for o in rng.choice(CUTTING_OPS, size=n_ops - 1)]
    for op in ops:
        writer, (dmin, dmax), (fmin, fmax) = OP_WRITERS[op]
        cx, cy = w.snap(rng.uniform(30, 70)), w.snap(rng.uniform(30, 70))
        depth = w.snap_z(rng.uniform(dmin, dmax))
        feed = w.feed(fmin, fmax)
        w.move("approach", "G0", z=5.0)
        w.move("approach", "G0", x=cx, y=cy)
        w.move("approach", "G0", z=1.0)
        writer(w, cx, cy, depth, feed)
        w.move("retract_end", "G0", z=5.0)
    w.raw("retract_end", "G53 G0 Z0")
    w.pos[2] = 10.0
    w.move("retract_end", "G0", x=0, y=0)
    w.raw("retract_end", "M30")
    return w.lines, w.ops


# ------------------------------------------------------------------------------------------------ motion ------
def _trapezoid(length: float, speed: float, accel: float, dt: float) -> np.ndarray:
    """Distance along the path at each sample [S] (S >= 1) for a rest-to-rest move."""
    if length <= 1e-9:
        return np.zeros(1)
    t_acc = speed / accel
    if speed * t_acc >= length:  # triangular profile: never reaches `speed`
        t_acc = math.sqrt(length / accel)
        speed = accel * t_acc
        t_flat = 0.0
    else:
        t_flat = (length - speed * t_acc) / speed
    total = 2 * t_acc + t_flat
    t = np.arange(1, int(math.ceil(total / dt)) + 1) * dt
    t = np.minimum(t, total)
    s = np.where(t < t_acc, 0.5 * accel * t ** 2,
                 np.where(t < t_acc + t_flat, 0.5 * accel * t_acc ** 2 + speed * (t - t_acc),
                          length - 0.5 * accel * np.maximum(total - t, 0) ** 2))
    return s


def _arc_center(start: np.ndarray, end: np.ndarray, radius: float, ccw: bool) -> np.ndarray:
    """Centre of the arc from start to end in the plane's two coordinates (R > 0: the shorter arc), as G2/G3
    define it."""
    mid = (start[:2] + end[:2]) / 2
    chord = end[:2] - start[:2]
    half = np.linalg.norm(chord) / 2
    offset = math.sqrt(max(radius ** 2 - half ** 2, 0.0))
    normal = np.array([-chord[1], chord[0]]) / max(2 * half, 1e-12)
    sign = 1.0 if ccw == (radius > 0) else -1.0
    return mid + sign * offset * normal


# Axes of each plane: (first, second, normal). G3 turns counter-clockwise from the first towards the second axis
# (LinuxCNC: G18's plane is Z-X, so seen from +Y), and the centre offsets are given in the same order.
PLANE_AXES = {"G17": (0, 1, 2), "G18": (2, 0, 1), "G19": (1, 2, 0)}
PLANE_OFFSET_LETTERS = {"G17": ("I", "J"), "G18": ("K", "I"), "G19": ("J", "K")}
# LinuxCNC G83_RAPID_DELTA (0.010 in): how far above the hole bottom a peck cycle comes back down in rapid.
PECK_RAPID_DELTA_MM = 0.254


def arc_path(start: np.ndarray, end: np.ndarray, line: ParsedLine, scale: float, speed: float,
             cfg: MachineConfig) -> np.ndarray:
    """Commanded positions [S, 3] of a G2/G3 line from `start` to `end` (mm), sampled with a trapezoidal profile.

    Centre: from R (the shorter arc for R > 0, the longer for R < 0) or from the plane's I/J/K offsets (relative to
    the start, in the line's units). With offsets, end == start is a full circle; P turns adds P-1 full turns.
    Motion along the plane's normal axis is linear in the swept angle (a helix)."""
    a, b, c = PLANE_AXES[line.plane]
    ccw = line.motion == "G3"
    p0, p1 = np.array([start[a], start[b]]), np.array([end[a], end[b]])
    if "R" in line.params:
        center = _arc_center(p0, p1, line.params["R"] * scale, ccw=ccw)
        radius = abs(line.params["R"]) * scale
    else:
        first, second = PLANE_OFFSET_LETTERS[line.plane]
        center = p0 + np.array([line.params.get(first, 0.0), line.params.get(second, 0.0)]) * scale
        radius = float(np.linalg.norm(p0 - center))
    a0 = math.atan2(p0[1] - center[1], p0[0] - center[0])
    a1 = math.atan2(p1[1] - center[1], p1[0] - center[0])
    sweep = (a1 - a0) % (2 * math.pi) if ccw else -((a0 - a1) % (2 * math.pi))
    if "R" not in line.params and abs(sweep) < 1e-9:
        sweep = 2 * math.pi if ccw else -2 * math.pi  # centre format, end == start: a full circle
    turns = int(line.params.get("P", 1))
    sweep += (turns - 1) * 2 * math.pi * (1 if ccw else -1)
    rise = end[c] - start[c]
    length = math.hypot(abs(sweep) * radius, rise)
    s = _trapezoid(length, speed, cfg.accel_mm_s2, cfg.dt_s)
    fraction = s / max(s[-1], 1e-9)
    angle = a0 + sweep * fraction if rise else a0 + np.sign(sweep) * s / radius
    xyz = np.empty((len(s), 3))
    xyz[:, a] = center[0] + radius * np.cos(angle)
    xyz[:, b] = center[1] + radius * np.sin(angle)
    xyz[:, c] = start[c] + rise * fraction
    xyz[-1] = end
    return xyz


def cycle_moves(pos: np.ndarray, line: ParsedLine, initial_z: float, scale: float) -> tuple[list, float]:
    """The moves of one canned-cycle block (G17, LinuxCNC semantics) from `pos`.

    Returns ([(kind, target [3] or dwell seconds)], initial_z), kind in rapid / feed / dwell. Per repeat (L): rapid
    in XY at the current height (first raised to R when the initial level is below it), rapid to R, then the cycle:
    G81 feed to Z; G82 and G86 dwell P at the bottom; G73 / G83 pecks of Q (G73 backs off 0.254 mm after each,
    G83 rapids out to R and back down to 0.254 mm above the bottom so far); G85 feeds out to R; G84 / G74 (tapping)
    and G89 (dwell P) feed out. Then a rapid retract to R (G99) or to the initial level `initial_z`, the height
    before the first block of this series, when that is above R (G98). In G91, X/Y are increments per repeat, R is
    relative to the initial level and Z to R."""
    words = {k: float(v) * scale for k, v in line.cycle_words.items()}
    incremental = line.distance == "G91"
    x, y = pos[0], pos[1]
    if incremental:
        r = initial_z + words["R"]
        bottom = r + words["Z"]
    else:
        r, bottom = words["R"], words["Z"]
        x = line.params["X"] * scale if "X" in line.params else x
        y = line.params["Y"] * scale if "Y" in line.params else y
    moves, here = [], pos.copy()

    def go(kind: str, x_: float, y_: float, z_: float) -> None:
        nonlocal here
        here = np.array([x_, y_, z_])
        moves.append((kind, here))

    old = initial_z
    if old < r:
        go("rapid", here[0], here[1], r)
        old = r
    clear = r if line.retract == "G99" else old
    for _ in range(int(line.params.get("L", 1))):
        if incremental:
            x += line.params.get("X", 0.0) * scale
            y += line.params.get("Y", 0.0) * scale
        go("rapid", x, y, here[2])
        if here[2] != r:
            go("rapid", x, y, r)
        motion = line.motion
        if motion in ("G73", "G83"):
            depth = r - words["Q"]
            while depth > bottom:
                go("feed", x, y, depth)
                if motion == "G83":
                    go("rapid", x, y, r)
                go("rapid", x, y, depth + PECK_RAPID_DELTA_MM)
                depth -= words["Q"]
        go("feed", x, y, bottom)
        if motion in ("G82", "G86", "G89") or (motion in ("G74", "G84") and "P" in words):
            moves.append(("dwell", words["P"] / scale))
        if motion == "G85":
            go("feed", x, y, r)
            go("rapid", x, y, clear)
        elif motion in ("G74", "G84", "G89"):
            go("feed", x, y, clear)
        else:
            go("rapid", x, y, clear)
    return moves, initial_z


REASON_CYCLE_DEPTH = "canned cycle R below its Z"
REASON_CYCLE_PECK = "canned cycle Q not positive"
REASON_CYCLE_REPEAT = "canned cycle L not a positive integer"
REASON_ARC_RADIUS = "arc R too small to reach the end point"
ARC_RADIUS_TOLERANCE_MM = 0.001
ROTARY_AXES, EXTRA_LINEAR_AXES = "ABC", "UVW"
REASON_ROTARY = "rotary axis A/B/C move (the virtual mill has X Y Z only)"
REASON_EXTRA_LINEAR = "U/V/W axis move (the virtual mill has X Y Z only)"


class MachineError(ValueError):
    """A parsed line the controller refuses for its values or the machine's position; the message is the reason."""


def check_line(pos: np.ndarray, target: np.ndarray, line: ParsedLine, scale: float) -> None:
    """Raise MachineError when LinuxCNC would refuse the line at this position (before anything moves), or when it
    moves an axis the 3-axis mill lacks (A/B/C, U/V/W: such axes stay at 0, so a non-zero word moves them)."""
    for letters, reason in ((ROTARY_AXES, REASON_ROTARY), (EXTRA_LINEAR_AXES, REASON_EXTRA_LINEAR)):
        if any(line.params.get(k, 0.0) != 0.0 for k in letters):
            raise MachineError(reason)
    if line.is_cycle:
        words = line.cycle_words
        repeats = line.values.get("L")
        if repeats is not None and (repeats != repeats.to_integral_value() or repeats < 1):
            raise MachineError(REASON_CYCLE_REPEAT)
        if line.motion in ("G73", "G83") and words["Q"] <= 0:
            raise MachineError(REASON_CYCLE_PECK)
        if line.distance == "G90" and words["R"] < words["Z"] or line.distance == "G91" and words["Z"] > 0:
            raise MachineError(REASON_CYCLE_DEPTH)
    elif line.motion in ("G2", "G3") and "R" in line.params:
        a, b, _ = PLANE_AXES[line.plane]
        half_chord = math.hypot(target[a] - pos[a], target[b] - pos[b]) / 2
        if abs(line.params["R"]) * scale < half_chord - ARC_RADIUS_TOLERANCE_MM:
            raise MachineError(REASON_ARC_RADIUS)


class Machine:
    """Executes parsed lines one by one on the virtual mill (position in mm, modal feed, spindle, coolant)."""

    def __init__(self, cfg: MachineConfig) -> None:
        self.cfg = cfg
        self.pos = np.array([0.0, 0.0, 10.0])
        self.feed = 500.0
        self.rpm: float | None = None
        self.coolant: int | None = None
        self.spindle_speed = 0.0
        self.initial_z: float | None = None  # canned-cycle initial level, kept while cycles follow each other
        self.dwell_samples = max(1, int(cfg.dwell_s / cfg.dt_s))

    def _straight(self, target: np.ndarray, speed: float) -> np.ndarray:
        length = float(np.linalg.norm(target - self.pos))
        if length <= 1e-12:
            return self.pos[None].copy()
        s = _trapezoid(length, speed, self.cfg.accel_mm_s2, self.cfg.dt_s)
        return self.pos[None] + (target - self.pos)[None] * (s / length)[:, None]

    def _segment(self, xyz, target, mode, index) -> Segment:
        return Segment(xyz, target, self.feed, mode, index, self.rpm, self.coolant)

    def _spindle_and_coolant(self, line: ParsedLine) -> None:
        self.spindle_speed = line.params.get("S", self.spindle_speed)
        codes = set(line.codes)
        if codes & {"M3", "M4"}:
            self.rpm = self.spindle_speed
        elif "M5" in codes or (self.rpm is not None and codes & {"M2", "M30"}):
            self.rpm = 0.0
        elif "S" in line.params and self.rpm:
            self.rpm = self.spindle_speed
        if codes & {"M7", "M8"}:
            self.coolant = 1 if "M7" in codes else 2
        elif "M9" in codes:
            self.coolant = 0

    def run(self, line: ParsedLine, index: int) -> Segment:
        """One accepted line -> its Segment (dwell samples at the current position for lines that do not move).

        Raises MachineError, with nothing changed, for a line the controller would refuse here."""
        cfg, pos = self.cfg, self.pos
        scale = 25.4 if line.units == "G20" else 1.0
        target = pos.copy()
        if not line.is_cycle:
            for axis, letter in enumerate("XYZ"):
                if letter in line.params:
                    value = line.params[letter] * scale
                    target[axis] = pos[axis] + value if line.distance == "G91" else value
            if "G53" in line.codes:
                target[2] = 10.0 if "Z" in line.params else target[2]
        if line.moves:
            check_line(pos, target, line, scale)
        self._spindle_and_coolant(line)
        self.feed = line.params.get("F", self.feed)
        if "G80" in line.codes or (line.moves and not line.is_cycle):
            self.initial_z = None  # the next cycle starts a new series
        if line.is_cycle and line.moves:
            if self.initial_z is None:
                self.initial_z = float(pos[2])
            moves, self.initial_z = cycle_moves(pos, line, self.initial_z, scale)
            parts, targets, modes = [], [], []
            for kind, end in moves:
                if kind == "dwell":
                    xyz = np.repeat(self.pos[None], max(1, int(round(end / cfg.dt_s))), 0)
                    end, mode = self.pos, 1
                else:
                    rapid = kind == "rapid"
                    xyz = self._straight(end, (cfg.rapid_mm_min if rapid else self.feed) / 60.0)
                    mode = 0 if rapid else 1
                    self.pos = end
                parts.append(xyz)
                targets.append(np.repeat(np.asarray(end)[None], len(xyz), 0))
                modes.append(np.full(len(xyz), mode))
            return self._segment(np.concatenate(parts), np.concatenate(targets), np.concatenate(modes), index)
        full_circle = line.motion in ("G2", "G3") and "R" not in line.params
        if not line.moves or (np.allclose(target, pos) and not full_circle):
            return self._segment(np.repeat(pos[None], self.dwell_samples, 0), target, 0, index)
        rapid = line.motion == "G0"
        speed = (cfg.rapid_mm_min if rapid else self.feed) / 60.0
        if line.motion in ("G2", "G3"):
            xyz, mode = arc_path(pos, target, line, scale, speed, cfg), 2
        else:
            xyz, mode = self._straight(target, speed), 0 if rapid else 1
        # Like a real controller's programmed-feed signal, feed_command keeps the modal F during rapids.
        self.pos = target
        return self._segment(xyz, target, mode, index)


def execute(lines: list[str], cfg: MachineConfig, skip_unsupported: bool = False
            ) -> tuple[list[Segment], list[ParsedLine]]:
    """Run a program on the virtual mill. Returns one Segment per line (dwell samples for non-moving lines).

    An unsupported line (ParsedLine.error, or a MachineError) raises ValueError naming it, or with
    skip_unsupported=True is left out of the segments (its ParsedLine is still returned)."""
    state = ModalState()
    machine = Machine(cfg)
    segments, parsed = [], []
    for index, text in enumerate(lines):
        line = parse_line(text, index + 1, state)
        parsed.append(line)
        if line.error is not None:
            if skip_unsupported:
                continue
            raise ValueError(f"line {index + 1} {text!r}: {line.error}")
        try:
            segments.append(machine.run(line, index))
        except MachineError as exc:
            if not skip_unsupported:
                raise ValueError(f"line {index + 1} {text!r}: {exc}") from exc
    return segments, parsed


# ------------------------------------------------------------------------------------------------ sensors -----
def _delay(x: np.ndarray, samples: int) -> np.ndarray:
    if samples <= 0:
        return x
    return np.concatenate([np.repeat(x[:1], samples, 0), x[:-samples]], 0)


def record(segments: list[Segment], ops: list[int], cfg: MachineConfig, rng: np.random.Generator) -> dict:
    """Sensor log of an executed program.

    Returns continuous [S, 27] float32, categorical [S, 4] int64, line_index [S], operation [S].
    """
    cmd = np.concatenate([s.command_xyz for s in segments])
    n = len(cmd)
    line_index = np.concatenate([np.full(len(s.command_xyz), s.line_index) for s in segments])
    target = np.concatenate([np.broadcast_to(s.target, s.command_xyz.shape) for s in segments])
    feed_cmd = np.concatenate([np.full(len(s.command_xyz), s.feed_mm_min) for s in segments])
    mode = np.concatenate([np.broadcast_to(s.mode, len(s.command_xyz)) for s in segments])
    operation = np.asarray(ops)[line_index]
    # Each cutting operation (a run of lines of one cutting op) runs at a speed drawn from SPINDLE_RPM_RANGE;
    # approach/retract keep the neighbouring operation's spindle.
    is_cut = [OPERATIONS[op] in CUTTING_OPS for op in ops]
    line_rpm, current, previous = np.zeros(len(ops)), 0.0, None
    for i, op in enumerate(ops):
        if is_cut[i] and op != previous:
            current = round(float(rng.uniform(*SPINDLE_RPM_RANGE)), -1)
        previous = op if is_cut[i] else None
        line_rpm[i] = current if is_cut[i] else np.nan
    rpm = np.zeros(n)
    current_rpm = 0.0
    sample_rpm = line_rpm[line_index] if len(ops) else np.zeros(n)
    for i in range(n):
        current_rpm = current_rpm if np.isnan(sample_rpm[i]) else sample_rpm[i]
        rpm[i] = current_rpm
    cutting_lines = [i for i, cut in enumerate(is_cut) if cut]
    if cutting_lines:
        rpm[line_index > cutting_lines[-1] + 1] = 0.0  # spindle stops after the retract that follows the last cut
    first_cut = int(np.flatnonzero(~np.isnan(sample_rpm))[0]) if (~np.isnan(sample_rpm)).any() else 0
    rpm[:first_cut] = 0.0 if np.isnan(sample_rpm[first_cut]) else sample_rpm[first_cut]
    if any(s.spindle_rpm is not None for s in segments):  # a user program states its own spindle
        rpm = np.concatenate([np.full(len(s.command_xyz), s.spindle_rpm or 0.0) for s in segments])

    coolant_on = np.isin(operation, [OPERATIONS.index(o) for o in CUTTING_OPS])
    if any(s.coolant is not None for s in segments):
        coolant_on = np.concatenate([np.full(len(s.command_xyz), bool(s.coolant)) for s in segments])
    noise = {name: rng.normal(0, scale, (n, width) if width > 1 else n) for name, width, scale in NOISE}
    continuous, categorical = sensor_channels(cmd, target, feed_cmd, mode, rpm, coolant_on, np.arange(n) * cfg.dt_s,
                                              cfg.dt_s, noise)
    return {"continuous": continuous, "categorical": categorical, "line_index": line_index, "operation": operation}


# Sensor noise, in the order `record` draws it: (name, columns, standard deviation).
NOISE = (("actual", 3, 0.002), ("spindle_speed", 1, 0.005), ("spindle_current", 1, 0.05), ("motor_current", 3, 0.03),
         ("proximity", 1, 0.01), ("pressure", 1, 0.05), ("vibration", 3, 0.02), ("velocity", 3, 0.05),
         ("acceleration", 3, 5.0))
# Samples before / after a sample that its channels depend on (delays of up to 3 samples, the acceleration's
# central differences of central differences): `SensorStream` keeps this much context around a chunk.
CONTEXT_BEFORE, CONTEXT_AFTER = 8, 4


def sensor_channels(cmd: np.ndarray, target: np.ndarray, feed_cmd: np.ndarray, mode: np.ndarray, rpm: np.ndarray,
                    coolant_on: np.ndarray, t: np.ndarray, dt: float, noise: dict[str, np.ndarray]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The sensor model: commanded motion [S, 3] (mm), end points [S, 3], feed [S] (mm/min), motion mode [S],
    spindle [S] (rpm), coolant on [S], sample times [S] (s) and per-sample noise (`NOISE` names, [S] or [S, 3])
    -> continuous [S, 27] float32, categorical [S, 4] int64. Sample i depends on samples i-CONTEXT_BEFORE ..
    i+CONTEXT_AFTER only, and on its own noise."""
    vel = np.gradient(cmd, dt, axis=0)
    acc = np.gradient(vel, dt, axis=0)
    speed = np.linalg.norm(vel, axis=1)
    depth = np.clip(STOCK_TOP_MM - cmd[:, 2], 0, None)
    cutting = (mode > 0) & (depth > 0)
    load = np.where(cutting, depth * (feed_cmd / 1000.0) * (0.5 + 0.5 * (rpm > 0)), 0.0)
    actual = _delay(cmd, 2) + noise["actual"]
    spindle_speed = _delay(rpm, 3) * (1 + noise["spindle_speed"]) - 5 * load
    spindle_current = np.where(rpm > 0, 1.5 + rpm / 10000.0, 0.1) + 2.0 * load + noise["spindle_current"]
    motor_current = 0.004 * acc + 0.3 * np.sign(vel) * (np.abs(vel) > 0.5) + 0.8 * load[:, None] * np.sign(vel)
    motor_current = _delay(motor_current, 1) + noise["motor_current"]
    proximity = np.clip(cmd[:, 2] - STOCK_TOP_MM, 0, PROXIMITY_RANGE_MM)
    proximity = _delay(proximity, 2) + noise["proximity"]
    pressure = np.where(coolant_on, 4.0 + 1.5 * load, 0.0) + noise["pressure"]
    vibration = ((0.05 + 0.5 * load)[:, None] * np.sin(2 * np.pi * (rpm / 60.0)[:, None] * t[:, None]
                                                       + np.array([0.0, 1.3, 2.1]))
                 + 0.0005 * acc + noise["vibration"])
    vel_meas = _delay(vel, 1) + noise["velocity"]
    acc_meas = _delay(acc, 1) + noise["acceleration"]
    dtg = target - cmd
    continuous = np.column_stack([
        actual, cmd, dtg, feed_cmd, rpm, vel_meas, acc_meas, spindle_speed, spindle_current, motor_current,
        proximity, pressure, vibration]).astype(np.float32)
    phase = np.where(speed < 1e-3, 0, np.where(np.gradient(speed) > 1e-6, 1, 2))
    categorical = np.column_stack([mode, (rpm > 0).astype(int), np.where(coolant_on, 2, 0), phase]).astype(np.int64)
    return continuous, categorical


WINDOW_ENDS = ("executing", "completed")
"""How windows are cut and labelled. executing (the seed's way): every `stride`-th sample and each line's last sample
ends a window, labelled with the line executing at that sample, so most windows end mid-move and their target's end
point and feed lie partly in the future. completed: one window per line, ending on the line's last sample, labelled
with that just-completed line, as a controller log that records the line number per sample is segmented; the whole
move the target describes has been commanded by the window's last step. `settle` (completed only) ends each window
that many samples later, into the next line, so the measured position, which trails the command by the servo delay, has
caught up with the end point (clipped at the log's end)."""


def check_window_end(value: str, where: str) -> None:
    """UserError naming `where` (the flag or config key) unless `value` is one of WINDOW_ENDS."""
    if value not in WINDOW_ENDS:
        from common.errors import UserError

        raise UserError(f"{where} {value!r}: use one of {', '.join(WINDOW_ENDS)}")


def windows(log: dict, window: int, stride: int, max_per_line: int,
            rng: np.random.Generator, window_end: str = "executing", settle: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Window start indices and the line each window is labelled with (see WINDOW_ENDS for `window_end`).

    At most `max_per_line` windows per line (chosen at random), so long cutting lines do not swamp short ones; with
    `completed` there is one per line anyway. Lines that end before the first full window have none.
    """
    check_window_end(window_end, "window_end")
    n = len(log["line_index"])
    if n < window:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    # The last sample of every line ends a window (so short lines are seen too); executing adds every stride-th one.
    last_of_line = np.flatnonzero(np.diff(log["line_index"], append=-1) != 0)
    if window_end == "completed":
        ends = np.minimum(last_of_line + settle, n - 1)
        labels = log["line_index"][last_of_line[ends >= window - 1]]
        ends = ends[ends >= window - 1]
        return ends - window + 1, labels.astype(np.int64)  # one window per line: max_per_line has nothing to drop
    ends = last_of_line[last_of_line >= window - 1]
    ends = np.unique(np.concatenate([np.arange(0, n - window + 1, stride) + window - 1, ends]))
    labels = log["line_index"][ends]
    keep = []
    for line in np.unique(labels):
        idx = np.flatnonzero(labels == line)
        if len(idx) > max_per_line:
            idx = rng.choice(idx, size=max_per_line, replace=False)
        keep.extend(idx.tolist())
    keep = np.sort(np.asarray(keep, dtype=np.int64))
    return ends[keep] - window + 1, labels[keep]


NOISE_COLUMNS = sum(width for _, width, _ in NOISE)


class SensorStream:
    """`record` for a user program fed in chunks of executed segments, with values that do not depend on where the
    chunks end: each sample is computed with CONTEXT_BEFORE samples before it and CONTEXT_AFTER after it (held back
    until the next chunk or the last), and its noise is its own row of one [S, NOISE_COLUMNS] standard-normal
    stream of `rng`. Spindle and coolant come from each segment (as `execute` sets them for a program's S / M words).
    Memory: the chunk plus a few samples."""

    def __init__(self, cfg: MachineConfig, rng: np.random.Generator) -> None:
        self.cfg, self.rng = cfg, rng
        self.buffer: dict[str, np.ndarray] | None = None
        self.first = 0  # sample index of buffer row 0
        self.emitted = 0  # samples returned so far

    def push(self, segments: list[Segment], final: bool = False) -> dict | None:
        """The next samples whose values are final: continuous [S, 27], categorical [S, 4], line_index [S] (None
        when there are none yet). `final=True` flushes everything (the program ended)."""
        if segments:
            new = {"cmd": np.concatenate([s.command_xyz for s in segments]),
                   "target": np.concatenate([np.broadcast_to(s.target, s.command_xyz.shape) for s in segments]),
                   "feed": np.concatenate([np.full(len(s.command_xyz), s.feed_mm_min) for s in segments]),
                   "mode": np.concatenate([np.broadcast_to(s.mode, len(s.command_xyz)) for s in segments]),
                   "rpm": np.concatenate([np.full(len(s.command_xyz), s.spindle_rpm or 0.0) for s in segments]),
                   "coolant": np.concatenate([np.full(len(s.command_xyz), bool(s.coolant)) for s in segments]),
                   "line_index": np.concatenate([np.full(len(s.command_xyz), s.line_index) for s in segments])}
            self.buffer = new if self.buffer is None else {k: np.concatenate([self.buffer[k], new[k]]) for k in new}
        if self.buffer is None:
            return None
        buf, n = self.buffer, len(self.buffer["cmd"])
        start, stop = self.emitted - self.first, n if final else n - CONTEXT_AFTER
        if stop <= start:
            return None
        scales = np.concatenate([np.full(width, scale) for _, width, scale in NOISE])
        block = np.zeros((n, NOISE_COLUMNS))
        block[start:stop] = self.rng.standard_normal((stop - start, NOISE_COLUMNS)) * scales
        noise, column = {}, 0
        for name, width, _ in NOISE:
            noise[name] = block[:, column:column + width] if width > 1 else block[:, column]
            column += width
        t = (self.first + np.arange(n)) * self.cfg.dt_s
        continuous, categorical = sensor_channels(buf["cmd"], buf["target"], buf["feed"], buf["mode"], buf["rpm"],
                                                  buf["coolant"], t, self.cfg.dt_s, noise)
        out = {"continuous": continuous[start:stop], "categorical": categorical[start:stop],
               "line_index": buf["line_index"][start:stop]}
        self.emitted = self.first + stop
        keep = max(0, stop - CONTEXT_BEFORE)
        self.buffer = {k: v[keep:] for k, v in buf.items()}
        self.first += keep
        return out


class WindowStream:
    """`windows` over a sensor log fed in order (by SensorStream), cut into windows as each line completes: the same
    window ends (each line's last sample, and every `stride`-th with window_end executing), labels, and random choice
    of at most `max_per_line` windows per line (0 = all) as `windows` with the same `rng`, for line indices that increase
    along the log. Memory: the current line plus `window` samples."""

    def __init__(self, window: int, stride: int, max_per_line: int, rng: np.random.Generator,
                 window_end: str = "executing", settle: int = 0) -> None:
        check_window_end(window_end, "window_end")
        self.window, self.stride, self.max_per_line, self.rng = window, stride, max_per_line, rng
        self.every_stride = window_end == "executing"
        self.settle = settle if window_end == "completed" else 0
        self.rows: dict[str, np.ndarray] | None = None
        self.first = 0  # sample index of buffer row 0
        self.cut = 0  # samples of completed lines (their windows are out)

    def push(self, part: dict | None, final: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Windows of the lines completed by `part`: continuous [W, T, 27], categorical [W, T, 4], labels [W]."""
        if part is not None and len(part["line_index"]):
            self.rows = part if self.rows is None else {k: np.concatenate([self.rows[k], part[k]]) for k in part}
        empty = (np.zeros((0, self.window, len(CHANNELS)), np.float32),
                 np.zeros((0, self.window, len(CATEGORICAL_CHANNELS)), np.int64), np.zeros(0, np.int64))
        if self.rows is None:
            return empty
        line = self.rows["line_index"]
        # rows of completed lines: all at the end, else up to the start of the last line (it may go on)
        done = len(line) if final else int(np.flatnonzero(line != line[-1])[-1]) + 1 if (line != line[-1]).any() else 0
        if self.settle and not final and done:  # a line's window waits for the `settle` samples after its end
            last = np.flatnonzero(np.append(line[:done - 1] != line[1:done], True))
            last = last[last + self.settle <= len(line) - 1]
            done = int(last[-1]) + 1 if len(last) else 0
        if done == 0:
            return empty
        position = self.first + np.arange(done)
        last_of_line = np.append(line[:done - 1] != line[1:done], True)
        finish = np.minimum(np.arange(done) + self.settle * last_of_line, len(line) - 1)  # buffer row ending a window
        is_end = ((position >= self.cut) & (self.first + finish >= self.window - 1)
                  & ((((position - self.window + 1) % self.stride == 0) & self.every_stride) | last_of_line))
        ends = np.flatnonzero(is_end)
        labels = line[ends]
        keep = []
        for label in np.unique(labels):
            idx = np.flatnonzero(labels == label)
            if self.max_per_line and len(idx) > self.max_per_line:
                idx = self.rng.choice(idx, size=self.max_per_line, replace=False)
            keep.extend(idx.tolist())
        ends = ends[np.sort(np.asarray(keep, dtype=np.int64))]
        index = finish[ends][:, None] - self.window + 1 + np.arange(self.window)[None]
        result = (self.rows["continuous"][index], self.rows["categorical"][index], line[ends].astype(np.int64))
        self.cut = self.first + done
        drop = max(0, done - self.window + 1)
        self.rows = {k: v[drop:] for k, v in self.rows.items()}
        self.first += drop
        return result
