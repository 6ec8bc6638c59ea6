"""G-code parser: program text -> one `ParsedLine` per source line, with modal state carried forward.

Handles what CAM post-processors and hand-written mill programs use: comments in `( )` and after `;`,
`%` delimiters, N-numbers, leading-zero codes (`G00`, `M03`), several codes on one line, modal motion
(`G0/G1/G2/G3` and the canned cycles `G73 G74 G81-G86 G89`, cancelled by `G80`) carried to following lines that
only hold axis words (never to a G10 / G28 / G30 / G52 / G92 line, whose axis words are its own data), a
cycle's sticky Z/R/P/Q (kept until the motion mode changes, as LinuxCNC does), retract mode (`G98/99`), plane
(`G17-19`), units (`G20/21`), distance mode (`G90/91`), tool length offset (`G43 H..` / `G49`), machine
coordinates (`G53`), and any letter+number word (X Y Z, I J K, R, F, S, T, H, P, ...). Values are kept twice:
`values` holds them exactly as written (`Decimal`, so `I3519.5012` stays 3519.5012), `params` as floats for arithmetic.
A comment (also one holding non-ASCII text) is removed before the line is read, so it never costs the command
before it.

LinuxCNC's programming-language layer is out of scope: O-word subroutines and loops, `#` parameters and
`[ ]` expressions. So are G87/G88. An arc without R or a centre offset of its plane and a cycle without its
required words are refused too (what a controller would refuse from the words alone; checks that need positions
or values belong to `virtual_mill.check_line`). Such a line is never a crash: it comes back with `error` set to a
short reason, and `ParseReport` counts the reasons.

    lines = parse_program(Path("part.nc").read_text())
    for line in lines:
        print(line.lineno, line.motion, line.codes, line.params, line.error)
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, replace
from decimal import Decimal

ARC_CODES = ("G2", "G3")
# Canned cycles (LinuxCNC's milling set). G87 (back boring) and G88 (manual retract) are parsed but refused.
CYCLE_CODES = ("G73", "G74", "G81", "G82", "G83", "G84", "G85", "G86", "G89")
UNSUPPORTED_CYCLES = ("G87", "G88")
MOTION_CODES = ("G0", "G1", *ARC_CODES, *CYCLE_CODES)
RETRACT_CODES = ("G98", "G99")
# Words a cycle needs (written on the line, or sticky from the previous block of the same cycle).
CYCLE_REQUIRED = {code: ("Z", "R") for code in CYCLE_CODES} | {"G73": ("Z", "R", "Q"), "G83": ("Z", "R", "Q"),
                                                              "G82": ("Z", "R", "P"), "G86": ("Z", "R", "P"),
                                                              "G89": ("Z", "R", "P")}
CYCLE_STICKY = ("Z", "R", "P", "Q")
# Arc centre offsets per plane: G17 I/J, G18 I/K (the plane's axes are Z, X), G19 J/K.
ARC_OFFSETS = {"G17": ("I", "J"), "G18": ("I", "K"), "G19": ("J", "K")}
PLANE_CODES = ("G17", "G18", "G19")
UNIT_CODES = ("G20", "G21")
DISTANCE_CODES = ("G90", "G91")
TOOL_LENGTH_CODES = ("G43", "G43.1", "G43.2", "G49")
# The modal state a program starts in (LinuxCNC's defaults); lines only state what differs from it.
DEFAULT_PLANE, DEFAULT_UNITS, DEFAULT_DISTANCE, DEFAULT_TOOL_LENGTH = "G17", "G21", "G90", "G49"
DEFAULT_RETRACT = "G99"  # canned cycles retract to the R plane unless G98 is programmed (EMC handbook)
MOTION_CANCEL = "G80"
# Non-modal (group 0) codes that take the line's axis words as their own data (LinuxCNC's "mode zero covets
# axes"): `G92 A0` sets an offset and `G28 Z0` names an intermediate point, so such a line never runs the modal
# motion. G4 (P only), G53 (a modifier of the line's G0/G1, modal or written) and G28.1 / G30.1 / G92.1-3 (no axis
# words) are not among them.
AXIS_CLAIMING_CODES = ("G10", "G28", "G30", "G52", "G92")
AXIS_LETTERS = frozenset("XYZABCUVW")
# Letters that are program structure, never a parameter of a command.
STRUCTURE_LETTERS = frozenset("GMNO")
# Reasons a line is not accepted (the keys of ParseReport.unsupported).
REASON_OWORD = "o-word subroutine/control flow"
REASON_PARAMETER = "# parameter"
REASON_EXPRESSION = "[ ] expression"
REASON_COMMENT = "unclosed ( comment"
REASON_MALFORMED = "malformed word"
REASON_REPEATED = "repeated word"
REASON_TWO_MOTIONS = "two motion codes on one line"
REASON_BLOCK_DELETE = "block delete /"
REASON_NON_ASCII = "non-ASCII characters"
REASON_POLAR = "polar coordinate @ ^ words"
REASON_SELECTOR = "$ selector word"
REASON_ARC_CENTRE = "arc without R or centre offsets in the active plane"
REASON_ARC_MIXED = "arc with both R and I/J/K"
REASON_ARC_PLANE = "arc centre offset outside the active plane"
REASON_CYCLE_WORDS = "canned cycle without its Z/R (or P/Q) word"
REASON_CYCLE_PLANE = "canned cycle outside G17"
REASON_CYCLE_UNSUPPORTED = "G87/G88 canned cycle"
REASON_AXIS_CLAIM = "G10/G28/G30/G52/G92 and a motion code on one line both use the axis words"

_WORD = re.compile(r"([A-Z])\s*([+-]?\s*(?:\d+\.?\d*|\.\d+))")
_INLINE_COMMENT = re.compile(r"\([^()]*\)")


@dataclass(frozen=True)
class ParsedLine:
    """One source line after parsing.

    codes: G/M codes in source order, normalised (`G00` -> `G0`, `M03` -> `M3`, `G91.1` kept).
    params: the other words, letter -> float value (units follow `units`; no unit conversion here).
    values: the same words as exact decimals, as written (`Decimal("3519.5012")`).
    motion: the motion mode this line executes with: its own G0-G3 / cycle or the modal one carried from earlier
        lines when the line holds axis words; None when the line does not move.
    carried: True when `motion` came from an earlier line.
    plane / units / distance / tool_length: the modal state in force on this line ("G17", "G21", "G90", "G49").
    tool_offset: the H word of the G43 in force (None when G43 came without H, or under G49).
    retract: canned-cycle retract mode in force ("G98" initial level, "G99" R plane, the default).
    cycle_words: for a canned-cycle line, the Z, R (and P, Q) it runs with, written or sticky from the previous
        block of the same cycle (LinuxCNC keeps them until the motion mode changes); empty otherwise.
    error: None, or the reason this line is unsupported (then codes/params are empty).
    """

    lineno: int
    text: str
    codes: tuple[str, ...] = ()
    params: dict[str, float] = field(default_factory=dict)
    motion: str | None = None
    carried: bool = False
    plane: str = "G17"
    units: str = "G21"
    distance: str = "G90"
    line_number: int | None = None
    error: str | None = None
    tool_length: str = "G49"
    tool_offset: Decimal | None = None
    values: dict[str, Decimal] = field(default_factory=dict)
    retract: str = DEFAULT_RETRACT
    cycle_words: dict[str, Decimal] = field(default_factory=dict)

    @property
    def is_cycle(self) -> bool:
        return self.motion in CYCLE_CODES

    @property
    def is_empty(self) -> bool:
        """Comment-only, blank or `%` lines: nothing to execute, nothing to tokenize."""
        return self.error is None and not self.codes and not self.params

    @property
    def modal_state(self) -> tuple:
        """(units, distance, plane, tool_length, tool_offset): what the line's words mean besides themselves."""
        return self.units, self.distance, self.plane, self.tool_length, self.tool_offset

    @property
    def moves(self) -> bool:
        return self.motion is not None and any(k in AXIS_LETTERS for k in self.params)


@dataclass
class ParseReport:
    """Counts over a program or corpus: lines seen, executable, empty, and unsupported by reason."""

    lines: int = 0
    executable: int = 0
    empty: int = 0
    unsupported: Counter = field(default_factory=Counter)

    def add(self, line: ParsedLine) -> None:
        self.lines += 1
        if line.error is not None:
            self.unsupported[line.error] += 1
        elif line.is_empty:
            self.empty += 1
        else:
            self.executable += 1

    def merge(self, other: ParseReport) -> None:
        self.lines += other.lines
        self.executable += other.executable
        self.empty += other.empty
        self.unsupported.update(other.unsupported)

    def as_dict(self) -> dict:
        return {"lines": self.lines, "executable": self.executable, "empty": self.empty,
                "unsupported_total": sum(self.unsupported.values()),
                "unsupported_by_reason": dict(self.unsupported.most_common())}


def normalise_code(letter: str, number: str) -> str:
    """`G`, `00` -> `G0`; `M`, `03` -> `M3`; `G`, `91.1` -> `G91.1`; `G`, `1.0` -> `G1`."""
    value = float(number)
    if value == int(value):
        return f"{letter}{int(value)}"
    return f"{letter}{value:g}"


@dataclass
class ModalState:
    """What G-code remembers between lines."""

    motion: str | None = None
    plane: str = DEFAULT_PLANE
    units: str = DEFAULT_UNITS
    distance: str = DEFAULT_DISTANCE
    tool_length: str = DEFAULT_TOOL_LENGTH
    tool_offset: Decimal | None = None
    retract: str = DEFAULT_RETRACT
    cycle_words: dict[str, Decimal] = field(default_factory=dict)


def _strip_comments(text: str) -> tuple[str, str | None]:
    """Remove `;` tails and `( )` comments. Returns (code_text, error_reason)."""
    body = text.split(";", 1)[0]
    previous = None
    while previous != body:
        previous = body
        body = _INLINE_COMMENT.sub(" ", body)
    if "(" in body or ")" in body:
        return body, REASON_COMMENT
    return body, None


def parse_line(text: str, lineno: int, state: ModalState) -> ParsedLine:
    """Parse one line and update `state` in place (only when the line is accepted)."""
    base = {"lineno": lineno, "text": text, "plane": state.plane, "units": state.units, "distance": state.distance,
            "tool_length": state.tool_length, "tool_offset": state.tool_offset}
    stripped = text.strip()
    if not stripped or stripped == "%":
        return ParsedLine(**base)
    body, error = _strip_comments(stripped)
    if not body.isascii():  # only the code part counts: `F500 ;<no-break space>feed` keeps its F
        return ParsedLine(**base, error=REASON_NON_ASCII)
    if error:
        return ParsedLine(**base, error=error)
    body = body.upper().strip()
    if body.startswith("/"):
        return ParsedLine(**base, error=REASON_BLOCK_DELETE)
    if "[" in body or "]" in body:
        return ParsedLine(**base, error=REASON_EXPRESSION)
    if "#" in body:
        return ParsedLine(**base, error=REASON_PARAMETER)
    if "@" in body or "^" in body:
        return ParsedLine(**base, error=REASON_POLAR)
    if "$" in body:
        return ParsedLine(**base, error=REASON_SELECTOR)
    body = body.rstrip("%").strip()  # CAM posts end with 'N1650%': the program delimiter after an N-number
    if re.match(r"^(N\s*\d+\s*)?O", body):
        return ParsedLine(**base, error=REASON_OWORD)
    if body == "%" or not body:
        return ParsedLine(**base)

    codes: list[str] = []
    values: dict[str, Decimal] = {}
    line_number = None
    position = 0
    for match in _WORD.finditer(body):
        if body[position:match.start()].strip():
            return ParsedLine(**base, error=REASON_MALFORMED)
        position = match.end()
        letter, number = match.group(1), match.group(2).replace(" ", "")
        if letter in "GM":
            codes.append(normalise_code(letter, number))
        elif letter == "N":
            line_number = int(float(number))
        elif letter == "O":
            return ParsedLine(**base, error=REASON_OWORD)
        elif letter in values:
            return ParsedLine(**base, error=REASON_REPEATED)
        else:
            values[letter] = Decimal(number)
    if body[position:].strip():
        return ParsedLine(**base, error=REASON_MALFORMED)

    if any(c in UNSUPPORTED_CYCLES for c in codes):
        return ParsedLine(**base, error=REASON_CYCLE_UNSUPPORTED)
    explicit_motion = [c for c in codes if c in MOTION_CODES]
    if len(explicit_motion) > 1:
        return ParsedLine(**base, error=REASON_TWO_MOTIONS)
    # Modal groups take effect on this line already (G91 X1 is incremental), so update a copy of the state first
    # and keep it only when the line is accepted.
    new = replace(state, cycle_words=dict(state.cycle_words))
    for code in codes:
        if code in PLANE_CODES:
            new.plane = code
        elif code in UNIT_CODES:
            new.units = code
        elif code in DISTANCE_CODES:
            new.distance = code
        elif code in RETRACT_CODES:
            new.retract = code
        elif code == MOTION_CANCEL:
            new.motion = None
            new.cycle_words = {}
        elif code in TOOL_LENGTH_CODES:
            new.tool_length = code
            new.tool_offset = values.get("H") if code == "G43" else None
    params = {k: float(v) for k, v in values.items()}
    has_axes = any(k in AXIS_LETTERS for k in params)
    claims_axes = any(c in AXIS_CLAIMING_CODES for c in codes)
    if claims_axes and explicit_motion and has_axes:
        return ParsedLine(**base, error=REASON_AXIS_CLAIM)
    carried = False
    if explicit_motion:
        motion: str | None = explicit_motion[0]
    elif has_axes and new.motion is not None and not claims_axes:
        motion, carried = new.motion, True
    else:
        motion = None
    cycle_words: dict[str, Decimal] = {}
    error = _check_motion(motion, values, new)
    if error:
        return ParsedLine(**base, error=error)
    if motion in CYCLE_CODES:
        if new.motion != motion:  # a new cycle mode forgets the previous cycle's sticky words
            new.cycle_words = {}
        new.cycle_words.update({k: values[k] for k in CYCLE_STICKY if k in values})
        cycle_words = dict(new.cycle_words)
        if any(k not in cycle_words for k in CYCLE_REQUIRED[motion]):
            return ParsedLine(**base, error=REASON_CYCLE_WORDS)
    elif explicit_motion:
        new.cycle_words = {}
    if explicit_motion:
        new.motion = explicit_motion[0]
    for name in ("motion", "plane", "units", "distance", "tool_length", "tool_offset", "retract", "cycle_words"):
        setattr(state, name, getattr(new, name))
    return ParsedLine(lineno=lineno, text=text, codes=tuple(codes), params=params, motion=motion, carried=carried,
                      plane=state.plane, units=state.units, distance=state.distance, line_number=line_number,
                      tool_length=state.tool_length, tool_offset=state.tool_offset, values=values,
                      retract=state.retract, cycle_words=cycle_words)


def _check_motion(motion: str | None, values: dict[str, Decimal], state: ModalState) -> str | None:
    """The reason a moving line cannot run as a controller would run it, or None.

    Arcs (LinuxCNC): R, or at least one centre offset of the active plane; not both; no offset letter of another
    plane. Canned cycles: XY plane only (their Z/R/P/Q are checked with the sticky words). Checks that need values
    or positions (R above Z, Q > 0, L a positive integer, an R reaching the end point) are the machine's
    (`virtual_mill.MachineError`)."""
    if motion in ARC_CODES:
        in_plane = ARC_OFFSETS[state.plane]
        offsets = [k for k in "IJK" if k in values]
        if "R" in values and offsets:
            return REASON_ARC_MIXED
        if any(k not in in_plane for k in offsets):
            return REASON_ARC_PLANE
        if "R" not in values and not offsets:
            return REASON_ARC_CENTRE
    elif motion in CYCLE_CODES:
        if state.plane != "G17":
            return REASON_CYCLE_PLANE
    return None


def parse_program(text: str) -> list[ParsedLine]:
    """Parse a whole program; never raises for bad lines (see ParsedLine.error)."""
    state = ModalState()
    return [parse_line(line, i + 1, state) for i, line in enumerate(text.splitlines())]


def read_program(path) -> str:
    """Program text from a file; undecodable bytes become U+FFFD (that line is then reported, not fatal)."""
    with open(path, "rb") as fh:
        return fh.read().decode("utf-8", errors="replace")
