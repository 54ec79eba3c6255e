"""How fast will it run? A step-time prediction for a compiled train step, from its HLO.

XLA's own cost analysis counts the body of a loop once (a scanned 32-layer model looks
like a 1-layer one), so the compiled module's text is read instead:

  - loops: every `while` multiplies what its body does by its trip count (the constant
    its condition compares the counter against), nested loops multiply;
  - HBM traffic: for every instruction outside fusions, the bytes of its operands and
    result (a fusion's inside stays on chip; buffers in on-chip memory spaces, `S(n)`
    layouts, are left out; a dynamic-update-slice moves its update, a dynamic-slice its
    result);
  - collectives: per chip, an all-gather receives (n - 1) / n of its result, a
    reduce-scatter sends (n - 1) / n of its operand, an all-reduce twice that, an
    all-to-all (n - 1) / n, a collective-permute its operand, for groups of n chips.
    Asynchronous ones (`*-start`, or XLA's collective matmuls, whose loops permute while
    they multiply) can hide behind compute; synchronous ones cannot.

Compute is the model's FLOPs per chip (6 x params + attention per token, plus what remat
recomputes; llm.flops) at the chip's dense bf16 peak. The prediction is a roofline with no
fitted constants:

    step = max(compute, HBM traffic / HBM bandwidth, async collectives / ICI bandwidth,
               DCN traffic / DCN bandwidth)
           + sync collectives / ICI bandwidth

Multislice: the TPU compiler splits a collective that spans slices into its in-slice
part (the collectives above, over local device ids) and a cross-slice part, host
transfers (`send`s handed to the "megascale" runtime, tagged with a transfer type and
the slices they span). Per chip, a cross-slice all-reduce of X over s slices moves
2 X (s - 1) / s over the data-center network (DCN), an all-gather of pieces X moves
X (s - 1), a reduce-scatter X (s - 1) / s, a one-to-one transfer (a ppermute between
slices) X. The sends are asynchronous, so their time overlaps compute.

It is an optimistic bound (every unit at its peak, perfect overlap); BENCHMARKS.md puts it
beside published measurements to say by how much.
"""

from __future__ import annotations

import dataclasses
import math
import re

_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4,
          "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8,
          "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1,
          "f8e5m2fnuz": 1, "token": 0}
# an array type with its optional layout: bf16[8,2048]{1,0:T(8,128)(2,1)S(1)}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_BYTES, key=len, reverse=True)) +
                    r")\[([\d,]*)\](\{[^}]*\})?")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*->.*\{\s*$")
_CALLED = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation)"
                     r"=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute",
                "ragged-all-to-all")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call",
         "conditional", "after-all", "partition-id", "replica-id", "opt-barrier", "domain",
         "add-dependency", "async-start", "async-update", "async-done"}


def _bytes_of(dtype: str, dims: str) -> float:
  return _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)


def _array_bytes(type_text: str, hbm_only: bool = True) -> float:
  total = 0.0
  for dtype, dims, layout in _ARRAY.findall(type_text):
    if hbm_only and layout and re.search(r"S\([1-9]\d*\)", layout):
      continue  # an on-chip memory space (VMEM, SMEM, ...)
    total += _bytes_of(dtype, dims)
  return total


@dataclasses.dataclass
class Instruction:
  name: str
  opcode: str
  type_text: str
  operands: list[str]
  attrs: str
  args: str = ""  # the text inside the parentheses (a parameter's index, a constant's value)


def _balanced(text: str, start: int) -> int:
  """Index just past the parenthesis group opening at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, ")": -1}.get(text[i], 0)
    if depth == 0:
      return i + 1
  return len(text)


def _parse_instruction(line: str) -> Instruction | None:
  line = line.strip()
  if line.startswith("ROOT "):
    line = line[5:]
  if " = " not in line:
    return None
  name, rhs = line.split(" = ", 1)
  if rhs.startswith("("):
    end = _balanced(rhs, 0)
    type_text, rest = rhs[:end], rhs[end:].lstrip()
  else:
    type_text, _, rest = rhs.partition(" ")
  paren = rest.find("(")
  if paren <= 0:
    return None
  opcode = rest[:paren]
  end = _balanced(rest, paren)
  operands = re.findall(r"%([\w.\-]+)", rest[paren:end])
  return Instruction(name.lstrip("%"), opcode, type_text, operands, rest[end:],
                     rest[paren + 1:end - 1])


def parse_hlo(text: str) -> tuple[dict[str, list[Instruction]], str]:
  """(computation name -> its instructions, the entry computation's name)."""
  computations: dict[str, list[Instruction]] = {}
  entry, current = "", None
  for line in text.splitlines():
    if not line.startswith((" ", "\t")):
      m = _HEADER.match(line)
      if m:
        current = computations.setdefault(m.group(1), [])
        if line.startswith("ENTRY"):
          entry = m.group(1)
      elif line.startswith("}"):
        current = None
      continue
    if current is not None:
      ins = _parse_instruction(line)
      if ins is not None:
        current.append(ins)
  if not entry:
    raise ValueError("no ENTRY computation in the HLO text")
  return computations, entry


def _trip_count(condition: list[Instruction]) -> int:
  """The bound a loop's condition compares its counter against (i < N): its largest
  integer constant; 1 when there is none."""
  return max([int(i.args) for i in condition if i.opcode == "constant" and
              re.fullmatch(r"\d+", i.args.strip())] + [1])


def _param_bytes_read(computations, fused: list[Instruction], index: int) -> float | None:
  """Bytes a fused computation reads of its parameter `index` when it only dynamic-slices
  it (also through nested fusions); None when it reads the whole of it."""
  name = next((i.name for i in fused if i.opcode == "parameter" and i.args == str(index)), None)
  users = [i for i in fused if name in i.operands]
  if not users:
    return 0.0
  total = 0.0
  for u in users:
    if u.opcode == "dynamic-slice" and u.operands[0] == name:
      total += _array_bytes(u.type_text)
    elif u.opcode == "fusion" and u.operands.count(name) == 1:
      nested = computations.get(dict(_CALLED.findall(u.attrs)).get("calls", ""))
      part = None if nested is None else _param_bytes_read(computations, nested,
                                                           u.operands.index(name))
      if part is None:
        return None
      total += part
    else:
      return None
  return total


def _fused_io_bytes(computations, fused: list[Instruction], n_operands: int,
                    result_bytes: float) -> tuple[list[float | None], float]:
  """What a fusion really moves: per operand, the bytes read when the fusion only
  dynamic-slices it (None: the whole operand), and the bytes written (the update, when
  it writes into an operand in place with dynamic-update-slice)."""
  types = {i.name: i.type_text for i in fused}
  params = {int(i.args): i.name for i in fused if i.opcode == "parameter" and i.args.isdigit()}
  read = [_param_bytes_read(computations, fused, k) for k in range(n_operands)]
  written = result_bytes
  for k in range(n_operands):
    name = params.get(k)
    in_place = [u for u in fused if u.opcode == "dynamic-update-slice" and u.operands and
                u.operands[0] == name]
    if in_place:
      read[k] = 0.0
      written = sum(_array_bytes(types.get(u.operands[1], "")) for u in in_place)
  return read, written


def _group_size(attrs: str, n_devices: int) -> int:
  """Chips per replica group of a collective."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
  if m:  # mesh['axis_0'=16,'axis_1'=1] {'axis_0'}
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2)))
  m = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)
  if m:  # [groups, size]<=[n]
    return int(m.group(1).split(",")[-1])
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
  if m:
    return len([x for x in m.group(1).split(",") if x])
  m = re.search(r"source_target_pairs=", attrs)
  return 2 if m else n_devices


_MEGASCALE_TYPE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')
_MEGASCALE_SLICES = re.compile(r'_xla_megascale_target="\{([\d,]+)\}')


def _dcn_bytes(ins: Instruction) -> float:
  """Bytes per chip a cross-slice host transfer (a megascale `send`) moves over DCN."""
  kind = _MEGASCALE_TYPE.search(ins.attrs).group(1)
  arrays = _ARRAY.findall(ins.type_text)
  data = _bytes_of(*arrays[0][:2]) if arrays else 0.0  # (data, context, token)
  slices = _MEGASCALE_SLICES.search(ins.attrs)
  s = len(slices.group(1).split(",")) if slices else 2
  share = {"ALL_REDUCE": 2 * (s - 1) / s, "ALL_GATHER": s - 1, "REDUCE_SCATTER": (s - 1) / s,
           "ALL_TO_ALL": (s - 1) / s}.get(kind, 1.0)  # ONE_TO_ONE: the data once
  return data * share


@dataclasses.dataclass
class Traffic:
  hbm_bytes: float = 0.0  # per chip per step
  sync_collective_bytes: float = 0.0  # per chip, moved over ICI, not overlappable
  async_collective_bytes: float = 0.0  # per chip, overlappable with compute
  collectives: dict = dataclasses.field(default_factory=dict)  # opcode -> bytes per chip
  dcn_bytes: float = 0.0  # per chip, between slices (multislice; overlappable)


def analyse(hlo_text: str, n_devices: int) -> Traffic:
  """HBM and collective traffic per chip of one execution of the module."""
  computations, entry = parse_hlo(hlo_text)
  out = Traffic()

  def visit(name: str, times: float, in_async: bool, in_loop_collective: bool):
    comp = computations.get(name)
    if comp is None:
      return
    types = {ins.name: ins.type_text for ins in comp}
    has_permute = any(i.opcode.startswith("collective-permute") for i in comp)
    windowed = in_loop_collective or (has_permute and "windowed_dot" in name)
    for ins in comp:
      op = ins.opcode
      called = dict(_CALLED.findall(ins.attrs))
      if op == "while":
        trips = _trip_count(computations.get(called.get("condition", ""), []))
        visit(called.get("body", ""), times * trips, in_async,
              "windowed_dot" in called.get("body", ""))
        continue
      if op in ("call", "async-start"):
        visit(called.get("calls", called.get("to_apply", "")), times,
              in_async or op == "async-start", windowed)
        continue
      if op == "conditional":
        branches = _BRANCHES.search(ins.attrs)
        names = re.findall(r"%?([\w.\-]+)", branches.group(1)) if branches else [
            called.get("true_computation", ""), called.get("false_computation", "")]
        for branch in names:  # one branch runs per execution: counted as their average
          visit(branch, times / max(len(names), 1), in_async, windowed)
        continue
      base = op.removesuffix("-start")
      if base in _COLLECTIVES:
        operand_bytes = sum(_array_bytes(types.get(o, ""), hbm_only=False) for o in ins.operands)
        result_bytes = _array_bytes(ins.type_text, hbm_only=False)
        n = _group_size(ins.attrs, n_devices)
        frac = (n - 1) / n if n > 1 else 0.0
        moved = {"all-gather": result_bytes * frac, "reduce-scatter": operand_bytes * frac,
                 "all-reduce": 2 * operand_bytes * frac, "all-to-all": operand_bytes * frac,
                 "ragged-all-to-all": operand_bytes * frac,
                 "collective-permute": operand_bytes}[base]
        if op.endswith("-start") and ins.type_text.startswith("("):
          # an async start's type is (operands, result[, context]): count the result
          arrays = _ARRAY.findall(ins.type_text)
          if base == "all-gather" and len(arrays) >= 2:
            dtype, dims, _ = arrays[len(ins.operands)]
            moved = _bytes_of(dtype, dims) * frac
        moved *= times
        overlapped = (op.endswith("-start") or in_async or windowed or
                      "async_collective_name" in ins.attrs)
        if overlapped:
          out.async_collective_bytes += moved
        else:
          out.sync_collective_bytes += moved
        out.collectives[base] = out.collectives.get(base, 0.0) + moved
      if op == "send" and "_xla_megascale_transfer_type" in ins.attrs:
        out.dcn_bytes += _dcn_bytes(ins) * times
      if op.endswith("-done") or op in _FREE:
        continue
      if op == "dynamic-update-slice" and len(ins.operands) > 1:
        moved = 2 * _array_bytes(types.get(ins.operands[1], ""))
      elif op == "dynamic-slice":
        moved = 2 * _array_bytes(ins.type_text)
      elif op == "fusion" and called.get("calls") in computations:
        read, written = _fused_io_bytes(computations, computations[called["calls"]],
                                        len(ins.operands),
                                        _array_bytes(ins.type_text))
        moved = written + sum(_array_bytes(types.get(o, "")) if r is None else r
                              for o, r in zip(ins.operands, read))
      else:
        moved = _array_bytes(ins.type_text) + sum(_array_bytes(types.get(o, ""))
                                                  for o in ins.operands)
      out.hbm_bytes += moved * times

  visit(entry, 1.0, False, False)
  return out


def int8_matmuls(hlo_text: str) -> int:
  """Dots and convolutions (how TPU HLO writes matmuls) whose operands are all s8."""
  computations, _ = parse_hlo(hlo_text)
  count = 0
  for comp in computations.values():
    types = {ins.name: ins.type_text for ins in comp}
    for ins in comp:
      if ins.opcode in ("dot", "convolution") and ins.operands and all(
          types.get(o, "").startswith("s8[") for o in ins.operands):
        count += 1
  return count


@dataclasses.dataclass
class Prediction:
  step_seconds: float
  compute_seconds: float
  hbm_seconds: float
  async_collective_seconds: float
  sync_collective_seconds: float
  tokens_per_second_per_chip: float
  mfu: float  # model FLOPs (without recomputation) / (step time x peak)
  bound: str  # what sets the step time: compute | HBM | collectives | DCN
  dcn_seconds: float = 0.0  # the traffic between slices at the DCN bandwidth


def predict(traffic: Traffic, *, model_flops_per_chip: float, executed_flops_per_chip: float,
            tokens_per_chip: float, peak_flops: float, hbm_bandwidth: float,
            ici_bandwidth: float, dcn_bandwidth: float | None = None) -> Prediction:
  """The roofline step time of the module docstring."""
  if traffic.dcn_bytes and not dcn_bandwidth:
    raise ValueError("the step moves data between slices: give the DCN bandwidth")
  compute = executed_flops_per_chip / peak_flops
  hbm = traffic.hbm_bytes / hbm_bandwidth
  overlapped = traffic.async_collective_bytes / ici_bandwidth
  exposed = traffic.sync_collective_bytes / ici_bandwidth
  dcn = traffic.dcn_bytes / dcn_bandwidth if traffic.dcn_bytes else 0.0
  parts = {"compute": compute, "HBM": hbm, "collectives": overlapped, "DCN": dcn}
  bound = max(parts, key=parts.get)
  step = max(parts.values()) + exposed
  if exposed > max(parts.values()):
    bound = "collectives"
  return Prediction(step, compute, hbm, overlapped, exposed, tokens_per_chip / step,
                    model_flops_per_chip / (step * peak_flops), bound, dcn)
