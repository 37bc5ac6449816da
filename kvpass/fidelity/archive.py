"""A reader of ``.pt2`` archives (``torch.export.save``) that executes nothing from the file.

``torch.export.load`` is not a checker's foundation: it runs code from the archive (``use_pickle`` weights and
constants through ``torch.load(weights_only=False)``, ``opaque_obj_*`` through ``pickle.loads``, legacy
``data/weights/*.pt`` fallbacks, ``sympy.sympify`` of SymInt ``expr_str``, AOTInductor ``.so`` loads and ``.cpp``
compiles with flags from the archive), and it rejects the very programs the check exists for (a strict export's
fake host-buffer constants: ``setStorage ... out of bounds``). This reader uses ``zipfile`` + ``json`` for the
graph (``models/<name>.json``, the serialized ExportedProgram schema of ``torch/_export/serde/schema.py``) and the
payload configs, and ``numpy`` for the raw bytes of only the constants a finding reports (to say "all zeros").

Never loaded, listed in :attr:`CheckResult.not_inspected`: pickled members (sample inputs, ``use_pickle``
entries, ``opaque_obj_*``/``custom_obj_*``, legacy ``.pt``), and ``data/aotinductor/``. SymInt expressions stay
strings. Nothing is extracted or written.

**Integrity.** Every member this reader reads is read whole through ``zipfile``, which checks its CRC-32 (a
mismatch is an error). Members it does not read (weights, pickles, libraries) are not read at all, so their CRC
is not checked: the analysis does not depend on them, and checking a 1 GiB weight payload would mean reading it.
``Limits(verify_all_crcs=True)`` (``kvpass check --verify-all-crcs``) streams every member to check every CRC.

**Bounds** (:class:`Limits`, all overridable): the archive size, the member count, each member's and the total
declared uncompressed size, the compression ratio and overlapping entries (zip bombs), member names (absolute
paths, ``..``, backslashes, NUL, duplicates), the size of each JSON member and its nesting depth (counted on the
raw bytes before ``json.loads``, so a 100,000-deep document never reaches the parser), the number of graph
nodes, each tensor's declared size (and that a non-empty payload holds every byte its ``tensor_meta`` addresses),
and the bytes read for a value check. A violation raises :class:`ProgramLoadError` with a one-line reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zipfile
from typing import Any

import numpy as np
import torch

from .findings import ProgramLoadError
from ..opfacts import name_facts, schema_facts
from .graph import CONST_NAME, Graph, Node, Program, Source, basename, op_schema

__all__ = ["Limits", "read_archive", "ArchiveReader"]

GiB = 1 << 30
MiB = 1 << 20


@dataclasses.dataclass
class Limits:
    """Bounds on an untrusted ``.pt2`` archive; every violation is a :class:`ProgramLoadError` (exit 2).

    Attributes:
        max_archive_bytes: size of the file (default 64 GiB).
        max_members: number of members (default 100,000).
        max_member_bytes: declared uncompressed size of one member (default 32 GiB).
        max_total_bytes: declared uncompressed size of all members (default 64 GiB).
        max_compression_ratio: uncompressed / compressed size of a compressed member (default 200).
        max_json_bytes: size of one JSON member, which is read and parsed (default 256 MiB).
        max_json_depth: nesting depth of a JSON member (default 512).
        max_nodes: graph nodes in all models and subgraphs together (default 500,000).
        max_tensor_bytes: bytes a tensor's ``tensor_meta`` may address (default 32 GiB).
        max_value_read_bytes: the most bytes read from one payload to tell whether a reported constant is all
            zeros; a larger constant's values are reported as unknown (default 1 GiB).
        verify_all_crcs: also stream every member not otherwise read to check its CRC-32 (default False).
    """

    max_archive_bytes: int = 64 * GiB
    max_members: int = 100_000
    max_member_bytes: int = 32 * GiB
    max_total_bytes: int = 64 * GiB
    max_compression_ratio: int = 200
    max_json_bytes: int = 256 * MiB
    max_json_depth: int = 512
    max_nodes: int = 500_000
    max_tensor_bytes: int = 32 * GiB
    max_value_read_bytes: int = 1 * GiB
    verify_all_crcs: bool = False


class _Bad(Exception):
    """A one-line reason why the archive cannot be read."""


# torch/_export/serde/schema.py ScalarType -> (torch dtype, numpy dtype of the same width used for a zero test,
# mask of the sign bit for floating types)
_DTYPES: dict[int, tuple] = {
    1: (torch.uint8, np.uint8, None), 2: (torch.int8, np.uint8, None), 3: (torch.int16, np.uint16, None),
    4: (torch.int32, np.uint32, None), 5: (torch.int64, np.uint64, None), 6: (torch.float16, np.uint16, 0x7FFF),
    7: (torch.float32, np.uint32, 0x7FFFFFFF), 8: (torch.float64, np.uint64, 0x7FFFFFFFFFFFFFFF),
    9: (torch.complex32, np.uint16, 0x7FFF), 10: (torch.complex64, np.uint32, 0x7FFFFFFF),
    11: (torch.complex128, np.uint64, 0x7FFFFFFFFFFFFFFF), 12: (torch.bool, np.uint8, None),
    13: (torch.bfloat16, np.uint16, 0x7FFF), 28: (torch.uint16, np.uint16, None),
    29: (torch.float8_e4m3fn, np.uint8, 0x7F), 30: (torch.float8_e5m2, np.uint8, 0x7F),
    31: (torch.float8_e4m3fnuz, np.uint8, 0xFF), 32: (torch.float8_e5m2fnuz, np.uint8, 0xFF),
    33: (torch.float8_e8m0fnu, np.uint8, 0xFF), 34: (torch.uint32, np.uint32, None),
    35: (torch.uint64, np.uint64, None),
}
_COMPLEX = {9, 10, 11}

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = np.zeros(256, dtype=np.int8)
_STEP[list(b"[{")] = 1
_STEP[list(b"]}")] = -1


def json_depth(data: bytes, limit: int) -> int:
    """Nesting depth of the JSON text ``data`` (brackets inside strings skipped), without parsing it.

    Strings are removed and the brackets kept with C-speed ``re``/``bytes`` operations, then the depth is a
    running sum (numpy, 16 Mi brackets at a time: bounded memory). ``limit`` is accepted for symmetry with the
    check that uses it; the whole text is scanned either way.
    """
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    chunk = 1 << 24
    for i in range(0, len(brackets), chunk):
        steps = _STEP[np.frombuffer(brackets[i:i + chunk], dtype=np.uint8)].astype(np.int64)
        running = np.cumsum(steps) + depth
        if len(running):
            deepest = max(deepest, int(running.max()))
            depth = int(running[-1])
    return deepest


class _CountingFile:
    """A read-only file that counts the bytes read from it (the figure in BENCHMARKS.md)."""

    def __init__(self, f):
        self.f, self.bytes_read = f, 0

    def read(self, n=-1):
        data = self.f.read(n)
        self.bytes_read += len(data)
        return data

    def seek(self, *a):
        return self.f.seek(*a)

    def tell(self):
        return self.f.tell()

    def seekable(self):
        return True

    def close(self):
        self.f.close()


def _check_name(name: str) -> None:
    if "\x00" in name or "\\" in name:
        raise _Bad(f"member {name!r}: a NUL or a backslash in a member name")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise _Bad(f"member {name!r}: an absolute path")
    if any(part == ".." for part in name.split("/")):
        raise _Bad(f"member {name!r}: a '..' component")


class ArchiveReader:
    """Reads one ``.pt2`` file within ``limits``; :meth:`programs` builds a :class:`Program` per model.

    ``bytes_read`` counts every byte read from the file (central directory, JSON, the payloads of reported
    constants). Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, path, limits: Limits | None = None):
        self.path = os.fspath(path)
        self.limits = limits or Limits()
        self._file: _CountingFile | None = None
        self.zf: zipfile.ZipFile | None = None
        self.members: dict[str, zipfile.ZipInfo] = {}
        self.not_inspected: list[str] = []
        self._listed: set[str] = set()
        self.nodes = 0

    @property
    def bytes_read(self) -> int:
        """Bytes read from the file so far."""
        return self._file.bytes_read if self._file is not None else 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()

    def error(self, reason: str) -> ProgramLoadError:
        """A :class:`ProgramLoadError` for this file."""
        return ProgramLoadError(self.path, reason)

    # ---- the container ---------------------------------------------------------------------------------

    def open(self) -> None:
        """Open the ZIP and check its directory against the limits (no member is read yet)."""
        lim = self.limits
        if not os.path.exists(self.path):
            raise _Bad("no such file")
        if os.path.isdir(self.path):
            raise _Bad("it is a directory, not a .pt2 file")
        size = os.path.getsize(self.path)
        if size > lim.max_archive_bytes:
            raise _Bad(f"the file is {size} bytes, over the limit of {lim.max_archive_bytes} (max_archive_bytes)")
        self._file = _CountingFile(open(self.path, "rb"))
        try:
            self.zf = zipfile.ZipFile(self._file)  # type: ignore[arg-type]
        except zipfile.BadZipFile as e:
            raise _Bad(f"not a ZIP archive ({e})") from None
        infos = self.zf.infolist()
        if len(infos) > lim.max_members:
            raise _Bad(f"{len(infos)} members, over the limit of {lim.max_members} (max_members)")
        total, spans = 0, []
        for info in infos:
            name = info.filename
            _check_name(name)
            if name in self.members:
                raise _Bad(f"member {name!r} appears twice")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise _Bad(f"member {name!r}: compression method {info.compress_type} (only stored or deflated)")
            if info.file_size > lim.max_member_bytes:
                raise _Bad(f"member {name!r} declares {info.file_size} bytes, over the limit of "
                           f"{lim.max_member_bytes} (max_member_bytes)")
            if info.compress_type == zipfile.ZIP_DEFLATED and \
                    info.file_size > lim.max_compression_ratio * max(info.compress_size, 1):
                raise _Bad(f"member {name!r} expands {info.file_size} / {info.compress_size} times, over the "
                           f"limit of {lim.max_compression_ratio} (max_compression_ratio): a zip bomb")
            if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
                raise _Bad(f"member {name!r}: stored with {info.compress_size} bytes but declares {info.file_size}")
            total += info.file_size
            start = info.header_offset
            end = start + 30 + len(info.orig_filename.encode("utf-8", "replace")) + info.compress_size
            if start < 0 or end > size:
                raise _Bad(f"member {name!r} lies outside the file (truncated archive?)")
            spans.append((start, end, name))
            self.members[name] = info
        if total > lim.max_total_bytes:
            raise _Bad(f"members declare {total} bytes in all, over the limit of {lim.max_total_bytes} "
                       f"(max_total_bytes)")
        spans.sort()
        for (s0, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise _Bad(f"members {n0!r} and {n1!r} overlap in the file: a zip bomb or a damaged archive")
        roots = {n.split("/", 1)[0] for n in self.members}
        if len(roots) != 1 or any("/" not in n for n in self.members):
            raise _Bad("not a PT2 archive: its members are not all in one top-level folder")
        self.root = roots.pop() + "/"

    def read(self, rel: str, limit: int, what: str) -> bytes:
        """The whole member ``rel`` (relative to the archive root), CRC-checked, at most ``limit`` bytes."""
        name = self.root + rel
        info = self.members.get(name)
        if info is None:
            raise _Bad(f"member {name!r} ({what}) is missing")
        if info.file_size > limit:
            raise _Bad(f"member {name!r} ({what}) is {info.file_size} bytes, over the limit of {limit}")
        try:
            with self.zf.open(info) as f:
                data = f.read(limit + 1)
        except zipfile.BadZipFile as e:
            raise _Bad(f"member {name!r}: {e}") from None
        except (OSError, EOFError, ValueError, RuntimeError) as e:
            raise _Bad(f"member {name!r}: cannot read it ({type(e).__name__}: {e})") from None
        if len(data) != info.file_size:
            raise _Bad(f"member {name!r}: {len(data)} bytes read, {info.file_size} declared (truncated?)")
        return data

    def verify_all(self) -> None:
        """Stream every member (1 MiB at a time) so that ``zipfile`` checks every CRC-32."""
        for name, info in self.members.items():
            try:
                with self.zf.open(info) as f:
                    while f.read(MiB):
                        pass
            except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as e:
                raise _Bad(f"member {name!r}: {e}") from None

    def read_json(self, rel: str, what: str) -> Any:
        """A JSON member, its nesting depth checked on the raw bytes before it is parsed."""
        data = self.read(rel, self.limits.max_json_bytes, what)
        depth = json_depth(data, self.limits.max_json_depth)
        if depth > self.limits.max_json_depth:
            raise _Bad(f"member {self.root + rel!r} ({what}) nests JSON deeper than {self.limits.max_json_depth} "
                       f"(max_json_depth)")
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as e:
            raise _Bad(f"member {self.root + rel!r} ({what}) is not valid JSON: {str(e)[:120]}") from None

    # ---- programs ----------------------------------------------------------------------------------------

    def programs(self) -> list[Program]:
        """One :class:`Program` per ``models/<name>.json``."""
        self.open()
        fmt = self.read("archive_format", 64, "archive format").decode("utf-8", "replace").strip()
        if fmt != "pt2":
            raise _Bad(f"not a PT2 archive: archive_format is {fmt[:20]!r}, not 'pt2'")
        if self.limits.verify_all_crcs:
            self.verify_all()
        rels = sorted(n[len(self.root):] for n in self.members)
        models = [r for r in rels if r.startswith("models/") and r.endswith(".json") and r.count("/") == 1]
        if not models:
            raise _Bad("not an exported program: no models/<name>.json member")
        programs = [self._program(r[len("models/"):-len(".json")]) for r in models]
        for r in rels:
            if r in self._listed:
                continue
            if r.startswith("data/aotinductor/"):
                self.not_inspected.append(f"{r} (AOTInductor artifact: never loaded or compiled)")
            elif r.endswith((".pt", ".pkl", ".pickle")) or "/opaque_obj_" in r or "/custom_obj_" in r:
                self.not_inspected.append(f"{r} (pickled)")
        return programs

    def _config(self, rel: str) -> dict:
        if self.root + rel not in self.members:
            return {}
        doc = self.read_json(rel, "payload config")
        config = _field(doc, "config", dict, rel)
        out = {}
        for name, entry in config.items():
            where = f"{rel}: entry {name!r}"
            if not isinstance(entry, dict):
                raise _Bad(f"{where}: expected an object")
            path = entry.get("path_name")
            if entry.get("use_pickle") or (isinstance(path, str) and path.startswith(("opaque_obj_", "custom_obj_"))):
                member = f"{rel.rsplit('/', 1)[0]}/{path}"
                self.not_inspected.append(f"{member} for {str(name)[:80]!r} (pickled)")
                self._listed.add(member)
                out[name] = None
                continue
            out[name] = self._payload(entry, where, rel.rsplit("/", 1)[0] + "/")
        return out

    def _payload(self, entry: dict, where: str, folder: str) -> dict:
        path = _field(entry, "path_name", str, where)
        _check_name(path)
        meta = _field(entry, "tensor_meta", dict, where)
        code = _field(meta, "dtype", int, where)
        if code not in _DTYPES:
            raise _Bad(f"{where}: unknown dtype code {code}")
        sizes = [_int(s, f"{where}: sizes") for s in _field(meta, "sizes", list, where)]
        strides = [_int(s, f"{where}: strides") for s in _field(meta, "strides", list, where)]
        offset = _int(meta.get("storage_offset", {"as_int": 0}), f"{where}: storage_offset")
        if len(sizes) != len(strides) or any(s < 0 for s in sizes) or any(s < 0 for s in strides) or offset < 0:
            raise _Bad(f"{where}: inconsistent sizes {sizes[:8]}, strides {strides[:8]}, offset {offset}")
        dtype, _, _ = _DTYPES[code]
        item = dtype.itemsize
        numel = 1
        for s in sizes:
            numel *= s
        needed = 0 if numel == 0 else (offset + sum((s - 1) * st for s, st in zip(sizes, strides)) + 1) * item
        if needed > self.limits.max_tensor_bytes:
            raise _Bad(f"{where}: tensor_meta claims {numel} elements ({needed} bytes), over the limit of "
                       f"{self.limits.max_tensor_bytes} (max_tensor_bytes)")
        info = self.members.get(self.root + folder + path)
        if info is None:
            raise _Bad(f"{where}: its payload member {self.root + folder + path!r} is missing")
        if info.file_size and info.file_size < needed:
            raise _Bad(f"{where}: tensor_meta addresses {needed} bytes but member {info.filename!r} holds "
                       f"{info.file_size}")
        return {"rel": folder + path, "sizes": sizes, "strides": strides, "offset": offset, "code": code,
                "dtype": dtype, "needed": needed, "stored": info.file_size}

    def all_zeros(self, payload: dict | None) -> bool | None:
        """Read one payload and tell whether the tensor it holds is all zeros (``None``: unknown)."""
        if payload is None or payload["stored"] == 0 or payload["needed"] == 0:
            return None  # pickled, or no bytes stored (a fake constant of a strict export)
        if payload["needed"] > self.limits.max_value_read_bytes:
            return None
        data = self.read(payload["rel"], max(payload["needed"], payload["stored"]), "tensor payload")
        _, unsigned, mask = _DTYPES[payload["code"]]
        item = np.dtype(unsigned).itemsize
        flat = np.frombuffer(data, dtype=unsigned, count=len(data) // item)
        sizes, strides = payload["sizes"], payload["strides"]
        if payload["code"] in _COMPLEX:
            sizes, strides = sizes + [2], [s * 2 for s in strides] + [1]
            offset = payload["offset"] * 2
        else:
            offset = payload["offset"]
        view = np.lib.stride_tricks.as_strided(flat[offset:], shape=sizes, strides=[s * item for s in strides],
                                               writeable=False)
        if mask is not None:
            view = view & unsigned(mask)
        return not bool(view.any())

    def _program(self, model: str) -> Program:
        where = f"models/{model}.json"
        doc = self.read_json(where, "exported program")
        gm = _field(doc, "graph_module", dict, where)
        weights = self._config(f"data/weights/{model}_weights_config.json")
        constants = self._config(f"data/constants/{model}_constants_config.json")
        graph = self._graph(_field(gm, "graph", dict, f"{where}: graph_module"), f"{where}: graph")
        sig = _field(gm, "signature", dict, f"{where}: graph_module")
        return self._signature(graph, sig, weights, constants, f"{where}: signature")

    def _signature(self, graph: Graph, sig: dict, weights: dict, constants: dict, where: str) -> Program:
        by_name = {n.name: n for n in graph.inputs}
        tokens, params, sources = [], [], []
        specs = _field(sig, "input_specs", list, where)
        for i, spec in enumerate(specs):
            kind, body = _union(spec, f"{where}: input_specs[{i}]")
            arg = body.get("arg") if isinstance(body, dict) else None
            name = _ref_name(arg) if kind == "user_input" else (arg.get("name") if isinstance(arg, dict) else None)
            node = by_name.get(name) if isinstance(name, str) else None
            if node is None:
                continue
            if kind == "user_input":
                tokens.append(node)
            elif kind == "parameter":
                params.append(node)
            elif kind == "tensor_constant":
                target = str(body.get("tensor_constant_name", name))
                sources.append(self._source(node, target, "constant", "lifted CONSTANT_TENSOR",
                                            constants.get(target, weights.get(target)),
                                            target in constants or target in weights))
            elif kind == "buffer":
                target = str(body.get("buffer_name", name))
                payload = weights.get(target, constants.get(target))
                known = target in weights or target in constants
                if CONST_NAME.match(basename(target)):
                    sources.append(self._source(node, target, "constant",
                                                "captured tensor constant lifted as a buffer", payload, known))
                else:
                    sources.append(self._source(node, target, "buffer", "registered buffer", payload, known))
        outs = {}
        for i, spec in enumerate(_field(sig, "output_specs", list, where)):
            kind, body = _union(spec, f"{where}: output_specs[{i}]")
            if kind in ("buffer_mutation", "user_input_mutation", "parameter_mutation") and isinstance(body, dict):
                arg = body.get("arg")
                target = body.get("buffer_name", body.get("user_input_name", body.get("parameter_name")))
                if i < len(graph.outputs) and graph.outputs[i] is not None:
                    outs[graph.outputs[i]] = target
        targets = {s.name: s.node for s in sources}
        mutations = []
        for written, target in outs.items():
            dest = targets.get(target) or by_name.get(target) if isinstance(target, str) else None
            if dest is not None:
                mutations.append((written, dest))
        return Program(graph=graph, tokens=tokens, sources=sources, params=params, mutations=mutations,
                       not_inspected=self.not_inspected)

    def _source(self, node: Node, target: str, kind: str, origin: str, payload, known: bool) -> Source:
        note = "" if payload is not None else ("values not inspected (pickled)" if known else "no payload entry")
        if payload is not None and payload["stored"] == 0 and payload["needed"]:
            note = "no bytes stored for it in the archive (a fake tensor at save time)"
        return Source(node, target, kind, origin, node.shape, node.dtype,
                      (lambda p=payload: self._values(p)), note)

    def _values(self, payload) -> bool | None:
        try:
            return self.all_zeros(payload)
        except _Bad as e:
            raise self.error(str(e)) from None
        except Exception as e:  # noqa: BLE001 - a hostile payload must never produce a traceback
            raise self.error(f"cannot read a tensor payload ({type(e).__name__}: {str(e)[:120]})") from None

    # ---- the graph --------------------------------------------------------------------------------------

    def _graph(self, gj: dict, where: str) -> Graph:
        g = Graph()
        values: dict[str, Node] = {}
        metas = gj.get("tensor_values", {})
        if not isinstance(metas, dict):
            raise _Bad(f"{where}: tensor_values is not an object")

        def make(name, op="call"):
            if not isinstance(name, str):
                raise _Bad(f"{where}: a value name is not a string")
            shape, dtype = _meta(metas.get(name))
            return Node(name=name, op=op, shape=shape, dtype=dtype)

        for i, arg in enumerate(_field(gj, "inputs", list, where)):
            name = _ref_name(arg)
            if name is None:
                continue
            node = make(name, "placeholder")
            values[name] = node
            g.inputs.append(node)
            g.add(node)
        for i, nj in enumerate(_field(gj, "nodes", list, where)):
            self.nodes += 1
            if self.nodes > self.limits.max_nodes:
                raise _Bad(f"more than {self.limits.max_nodes} graph nodes (max_nodes)")
            here = f"{where}: nodes[{i}]"
            if not isinstance(nj, dict):
                raise _Bad(f"{here}: expected an object")
            target = _field(nj, "target", str, here)
            ns, opname, overload = _parse_target(target)
            outputs = _field(nj, "outputs", list, here)
            out_names = _output_names(outputs, here)
            first = out_names[0] if len(out_names) == 1 and out_names[0] is not None else None
            node = make(first or str(nj.get("name") or f"{opname}_{i}"))
            here = f"{where}: node {node.name!r} ({target[:80]})"
            node.opname, node.target = opname, (f"{ns}.{opname}.{overload}" if ns and overload else
                                                f"{ns}.{opname}" if ns else opname)
            meta = nj.get("metadata") or {}
            trace = meta.get("stack_trace") if isinstance(meta, dict) else None
            node.stack_trace = trace if isinstance(trace, str) else None
            names = []
            for j, na in enumerate(_field(nj, "inputs", list, here)):
                if not isinstance(na, dict):
                    raise _Bad(f"{here}: inputs[{j}] is not an object")
                value = self._arg(na.get("arg"), values, f"{here}: input {na.get('name')!r}")
                if na.get("kind") == 2:
                    node.kwargs[str(na.get("name"))] = value
                else:
                    node.args.append(value)
                    names.append(str(na.get("name")))
            schema = op_schema(ns, opname, overload) if ns and ns != "higher_order" else None
            s_names, node.writes, node.view = schema_facts(schema)
            if schema is None:
                node.writes, node.view = name_facts(opname)
            node.arg_names = names if any(names) else s_names
            node.subgraphs = [s for a in node.args if isinstance(a, Node) and a.op == "subgraph"
                              for s in a.subgraphs]
            g.add(node)
            if first is None:
                for k, out in enumerate(out_names):
                    if out is None:
                        continue
                    item = make(out)
                    item.opname, item.target, item.args = "getitem", "getitem", [node, k]
                    item.stack_trace = node.stack_trace
                    values[out] = g.add(item)
            else:
                values[first] = node
        g.outputs = [values.get(n) if n is not None else None
                     for n in _output_names(_field(gj, "outputs", list, where), where)]
        return g

    def _arg(self, arg: Any, values: dict, where: str):
        kind, body = _union(arg, where)

        def ref(name):
            if not isinstance(name, str) or name not in values:
                raise _Bad(f"{where}: refers to undefined value {str(name)[:60]!r}")
            return values[name]

        if kind == "as_tensor":
            return ref(body.get("name") if isinstance(body, dict) else None)
        if kind in ("as_tensors", "as_optional_tensors"):
            if not isinstance(body, list):
                raise _Bad(f"{where}: {kind} is not a list")
            out = []
            for x in body:
                if isinstance(x, dict) and "as_tensor" in x:
                    out.append(ref(x["as_tensor"].get("name") if isinstance(x["as_tensor"], dict) else None))
                elif isinstance(x, dict) and "name" in x:
                    out.append(ref(x["name"]))
                else:
                    out.append(None)
            return out
        if kind == "as_optional_tensor":
            if isinstance(body, dict) and "as_tensor" in body:
                return ref(body["as_tensor"].get("name") if isinstance(body["as_tensor"], dict) else None)
            return None
        if kind in ("as_sym_int", "as_sym_bool", "as_sym_float"):
            if isinstance(body, dict) and "as_name" in body:
                return values.get(body["as_name"], body["as_name"])
            return body.get("as_int", body.get("as_float", body.get("as_bool"))) if isinstance(body, dict) else None
        if kind in ("as_sym_ints", "as_sym_bools", "as_sym_floats"):
            return [values.get(x.get("as_name")) if isinstance(x, dict) and "as_name" in x else
                    (next(iter(x.values()), None) if isinstance(x, dict) else None) for x in (body or [])]
        if kind == "as_graph":
            if not isinstance(body, dict):
                raise _Bad(f"{where}: as_graph is not an object")
            sub = self._graph(_field(body, "graph", dict, where), f"{where}: graph {str(body.get('name'))[:40]!r}")
            return Node(name=str(body.get("name")), op="subgraph", subgraphs=[sub])
        if kind == "as_scalar_type":
            return _DTYPES.get(body, (None,))[0]
        if kind in ("as_int", "as_ints", "as_float", "as_floats", "as_bool", "as_bools", "as_string", "as_strings",
                    "as_int_lists", "as_float_lists", "as_none"):
            return None if kind == "as_none" else body
        return None  # devices, layouts, custom objects, operators: not data


def _field(d: Any, key: str, typ, where: str):
    if not isinstance(d, dict):
        raise _Bad(f"{where}: expected an object")
    v = d.get(key)
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise _Bad(f"{where}: field {key!r} missing or not a {typ.__name__}")
    return v


def _union(d: Any, where: str):
    if not isinstance(d, dict) or len(d) != 1:
        raise _Bad(f"{where}: expected an object with exactly one field")
    return next(iter(d.items()))


def _int(v: Any, where: str) -> int:
    if isinstance(v, dict) and isinstance(v.get("as_int"), int) and not isinstance(v.get("as_int"), bool):
        return v["as_int"]
    raise _Bad(f"{where}: a size that is not a plain integer")


def _ref_name(arg: Any) -> str | None:
    if not isinstance(arg, dict) or len(arg) != 1:
        return None
    kind, body = next(iter(arg.items()))
    if isinstance(body, dict):
        name = body.get("name", body.get("as_name"))
        return name if isinstance(name, str) else None
    return None


def _output_names(outputs: list, where: str) -> list:
    if len(outputs) == 1:
        kind, body = _union(outputs[0], where)
        if kind in ("as_tensors", "as_sym_ints", "as_optional_tensors") and isinstance(body, list):
            return [_ref_name({"x": x}) if isinstance(x, dict) and "name" in x else _ref_name(x) for x in body]
    return [_ref_name(o) for o in outputs]


def _meta(meta: Any):
    if not isinstance(meta, dict):
        return None, None
    code = meta.get("dtype")
    dtype = _DTYPES.get(code, (None,))[0] if isinstance(code, int) else None
    sizes = meta.get("sizes")
    if not isinstance(sizes, list):
        return None, dtype
    shape = []
    for s in sizes:
        if isinstance(s, dict) and isinstance(s.get("as_int"), int):
            shape.append(s["as_int"])
        elif isinstance(s, dict) and isinstance(s.get("as_expr"), dict):
            shape.append(str(s["as_expr"].get("expr_str", "?"))[:80])  # never evaluated
        else:
            shape.append("?")
    return tuple(shape), dtype


def _parse_target(target: str) -> tuple[str, str, str]:
    """``torch.ops.aten.copy_.default`` -> ``("aten", "copy_", "default")``; HOPs and Python callables too."""
    parts = target.split(".")
    if len(parts) >= 4 and parts[0] == "torch" and parts[1] == "ops":
        if parts[2] == "higher_order":
            return "higher_order", parts[3], ""
        return parts[2], parts[3], parts[4] if len(parts) > 4 else "default"
    return "", parts[-1], ""


def read_archive(path, limits: Limits | None = None) -> tuple[list[Program], ArchiveReader]:
    """Read ``path`` without executing anything from it: its programs, and the open reader (close it after
    the analysis; it reads the payloads of reported constants on demand).

    Raises:
        ProgramLoadError: the file is missing, is not a PT2 archive, is damaged or breaks a limit; the reason
            is one line naming the member or node.
    """
    reader = ArchiveReader(path, limits)
    try:
        return reader.programs(), reader
    except _Bad as e:
        reader.close()
        raise reader.error(str(e)) from None
    except (MemoryError, RecursionError) as e:
        reader.close()
        raise reader.error(f"reading it exhausted a resource ({type(e).__name__})") from None
    except Exception as e:  # noqa: BLE001 - a hostile file must never produce a traceback
        reader.close()
        raise reader.error(f"cannot parse it ({type(e).__name__}: {str(e)[:120]})") from None
