"""ONNX: export with optimum-onnx (KV cache), quantize with onnxruntime, build onnxruntime-genai's
format (the runtimes that run the folders are formats/ort.py and formats/ort_genai.py)."""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from edgekd import architectures
from edgekd.atomic import atomic_path
from edgekd.errors import EdgekdError
from edgekd.formats.ort import MODEL, model_files

_QUANT_KINDS = {"int4": 4, "int8": 8}
# Above this the protobuf limit (2 GiB) forces weights into a side file.
_EXTERNAL_DATA_BYTES = 1 << 30


def _weights_bytes(onnx_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_files(onnx_dir))


# Bytes one protobuf message can hold. optimum's post-processing of an export (which stores a tied
# embedding once) loads the whole model into one, so past it the export fails there.
PROTOBUF_LIMIT = 2**31


def post_processable(params: int) -> bool:
    """Whether optimum can post-process the export of a model of `params` parameters: its fp32
    weights fit one protobuf message (a Qwen2.5-0.5B does, just; a 1.5B does not)."""
    return 4 * params < PROTOBUF_LIMIT


def export_onnx(model_dir: Path, out_dir: Path) -> Path:
    """Export a Hugging Face folder to `out_dir` (fp32, KV cache), with its tokenizer.json."""
    from optimum.exporters.onnx import main_export

    from edgekd import models

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise EdgekdError(f"{model_dir} has no tokenizer.json: save the tokenizer with the model")
    params = models.params_at(model_dir)
    with atomic_path(out_dir) as tmp:
        main_export(
            str(model_dir),
            tmp,
            task="text-generation-with-past",
            device="cpu",
            dtype="fp32",
            do_validation=False,  # parity is measured by the caller, in its own report
            local_files_only=True,
            library_name="transformers",
            # Past the limit a tied embedding stays two weights (embedding and head).
            no_post_process=params is not None and not post_processable(params),
        )
        # transformers may save a sentencepiece file that disagrees with tokenizer.json.
        (tmp / "tokenizer.model").unlink(missing_ok=True)
        if not (tmp / MODEL).is_file():
            raise EdgekdError(f"optimum wrote no {MODEL} for {model_dir}")
    return out_dir


def _nbits_quantizer_class():
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    from onnxruntime.quantization import matmul_nbits_quantizer

    # Importing it runs logging.basicConfig(level=INFO) for the whole process: undo that, and
    # keep its per-node chatter out of the build log.
    root.setLevel(level)
    root.handlers[:] = handlers
    logging.getLogger(matmul_nbits_quantizer.__name__).setLevel(logging.WARNING)
    return matmul_nbits_quantizer.MatMulNBitsQuantizer


def _untie_transposed_weights(model) -> None:
    """Give each MatMul fed by Transpose(initializer) a constant, already transposed weight.

    optimum shares a tied embedding with lm_head through a Transpose node; the quantizer only
    touches MatMuls whose weight is a constant, so lm_head (the largest matrix of a small model)
    would otherwise stay float.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in list(model.graph.node):
        users = consumers.get(node.output[0], [])
        if (
            node.op_type != "Transpose"
            or node.input[0] not in inits
            or not users
            or any(u.op_type != "MatMul" for u in users)
        ):
            continue
        weight = numpy_helper.to_array(inits[node.input[0]])
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        transposed = np.ascontiguousarray(weight.transpose(perm))
        model.graph.initializer.append(numpy_helper.from_array(transposed, node.output[0]))
        model.graph.node.remove(node)


# onnxruntime's MatMulNBits quantizers edgekd measures for int4 (bench/quant_table.py): round to
# nearest, symmetric or with a zero point; HQQ (half-quadratic, zero points in float); its
# k-quant scale search; GPTQ on calibration sequences.
INT4_METHODS = ("rtn_sym", "rtn_asym", "hqq", "k_quant", "gptq")


class Calibration:
    """onnxruntime's CalibrationDataReader (for GPTQ) over token sequences, each run from an
    empty cache with the inputs the exported graph declares."""

    def __init__(self, onnx_dir: Path, sequences: list[list[int]]):
        from edgekd.device_runner import OrtSession

        session = OrtSession(str(onnx_dir), threads=1)
        self.feeds = [session.feed(list(s), session.empty_past(), 0) for s in sequences]
        self.i = 0

    def get_next(self) -> dict | None:
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self) -> None:
        self.i = 0

    def __iter__(self):
        # GPTQ's data loader iterates a copy of the reader rather than calling get_next.
        return iter(self.feeds)


@contextlib.contextmanager
def _zero_points_packed_per_column():
    """Make onnxruntime's k-quant and GPTQ paths pack 4-bit zero points one column at a time.

    Both build their MatMulNBits nodes with neural_compressor's make_matmul_weight_only_node,
    which packs the zero points of all columns as one run of nibbles and then reshapes it to
    (N, -1): when a column has an odd number of blocks (K=576 at block 64 or 128) a column's
    last zero point shares a byte with the next column's first and the reshape fails ("cannot
    reshape array of size 2592 into shape (576,newaxis)"). MatMulNBits reads
    ceil(blocks / 2) bytes per column, so each column is padded to an even count here.
    """
    from onnx import TensorProto, helper
    from onnxruntime.quantization.neural_compressor import weight_only

    original = weight_only.make_matmul_weight_only_node

    def make_node(node, weight_shape, num_bits, group_size, k_blocks, q_weight, scale,
                  zero_point, accuracy_level=0):  # fmt: skip
        if num_bits != 4 or zero_point is None:
            return original(node, weight_shape, num_bits, group_size, k_blocks, q_weight, scale,
                            zero_point, accuracy_level)  # fmt: skip
        q_node, inits = original(
            node, weight_shape, num_bits, group_size, k_blocks, q_weight, scale, None,
            accuracy_level,
        )  # fmt: skip
        levels = np.asarray(zero_point, dtype=np.uint8).reshape(weight_shape[1], k_blocks)
        if k_blocks % 2:  # 8, the nibble MatMulNBits takes for a missing zero point
            levels = np.pad(levels, ((0, 0), (0, 1)), constant_values=8)
        packed = levels[:, ::2] | (levels[:, 1::2] << 4)
        name = node.input[1] + "_zp"
        inits.append(
            helper.make_tensor(name, TensorProto.UINT8, packed.shape, packed.tobytes(), True)
        )
        q_node.input.append(name)  # MatMulNBits' inputs: A, B, scales, zero_points
        return q_node, inits

    weight_only.make_matmul_weight_only_node = make_node
    try:
        yield
    finally:
        weight_only.make_matmul_weight_only_node = original


def _int8_nodes(model, projections: list[str]) -> list[str]:
    """The MatMuls of these projections (optimum names them /model/layers.N/.../v_proj/MatMul)."""
    nodes = []
    for proj in projections:
        found = [
            n.name for n in model.graph.node if n.op_type == "MatMul" and f"/{proj}/" in n.name
        ]
        if not found:
            raise EdgekdError(
                f"export_onnx.int8_projections: the exported graph has no {proj} MatMul; "
                "remove it from the list"
            )
        nodes += found
    return nodes


def _int4_pass(
    model, method: str, block_size: int, accuracy_level: int, exclude: list, calibration
):
    """The int4 MatMul pass of `method` (the `exclude` nodes left as they are): its quantizer."""
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    common = {
        "block_size": block_size,
        "accuracy_level": accuracy_level,
        "nodes_to_exclude": exclude,
    }
    if method in ("rtn_sym", "rtn_asym"):
        return _nbits_quantizer_class()(
            model,
            bits=4,
            is_symmetric=method == "rtn_sym",
            op_types_to_quantize=("MatMul", "Gather"),
            **common,
        )
    if method == "hqq":
        config = nbits.HQQWeightOnlyQuantConfig(block_size=block_size, bits=4)
    elif method == "k_quant":
        config = nbits.KQuantWeightOnlyQuantConfig()
    else:
        if calibration is None:
            raise EdgekdError("ONNX int4 method gptq needs calibration sequences")
        config = nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=calibration)
    quantizer = _nbits_quantizer_class()(
        model, bits=4, is_symmetric=False, algo_config=config, **common
    )
    if method == "gptq":
        # onnxruntime hands GPTQ no excluded nodes (it does for RTN and k-quant): mark them
        # "fp32", the way it marks them for those, so the later passes find them unquantized.
        nodes = quantizer._generate_q4_node_config
        quantizer._generate_q4_node_config = lambda: {**nodes(), **dict.fromkeys(exclude, "fp32")}
    return quantizer


def quantize_onnx(
    onnx_dir: Path,
    out_dir: Path,
    kind: str,
    *,
    block_size: int,
    accuracy_level: int,
    method: str,
    head_bits: int,
    int8_projections: list[str],
    calibration=None,
) -> Path:
    """Quantize an exported folder's weights into `out_dir`, a folder with the same files.

    Weight-only, block-wise (`block_size` weights per scale), with onnxruntime's MatMulNBits
    quantizer; activations stay float. 'int4': MatMul weights by `method` (one of INT4_METHODS;
    gptq takes `calibration`, an onnxruntime CalibrationDataReader) and the token embedding
    (GatherBlockQuantized, round to nearest, 4 bits: the only width onnxruntime gives a Gather)
    in 4 bits, the MatMuls of `int8_projections` (names like v_proj) in 8 bits, symmetric, the
    output matrix (lm_head) in `head_bits` (8 or 4; 32 keeps it float); 'int8':
    every MatMul weight in 8 bits, symmetric, the embedding stays float. `accuracy_level` is
    MatMulNBits' compute type: 4 multiplies in int8 on the CPU.
    """
    import onnx

    # Not quantize_dynamic for int8: it also quantizes activations per tensor, and on
    # SmolLM2-135M that measured KL 0.7-0.9 against torch where 8-bit weight-only gives 0.002.
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    if kind not in _QUANT_KINDS:
        raise EdgekdError(f"ONNX quantization {kind!r} is not one of {', '.join(_QUANT_KINDS)}")
    if block_size < 16 or block_size & (block_size - 1):
        raise EdgekdError(f"ONNX quantization block_size {block_size} must be a power of two >= 16")
    if method not in INT4_METHODS:
        raise EdgekdError(f"ONNX int4 method {method!r} is not one of {', '.join(INT4_METHODS)}")
    if not (onnx_dir / MODEL).is_file():
        raise EdgekdError(f"{onnx_dir} has no {MODEL}: export the model first")
    external = _weights_bytes(onnx_dir) > _EXTERNAL_DATA_BYTES
    model = onnx.load(onnx_dir / MODEL)
    _untie_transposed_weights(model)
    # Without an accuracy level onnxruntime's CPU kernel for 8-bit weights dequantizes the whole
    # matrix on every call: the 8-bit lm_head alone took ~110 ms per decoded token on SmolLM2-135M
    # (int4 decoded at 1/6 of fp32's speed); at level 4 int4 decodes 2.6x faster than fp32.
    quantizer_class = functools.partial(_nbits_quantizer_class(), accuracy_level=accuracy_level)
    head = [n.name for n in model.graph.node if n.op_type == "MatMul" and "logits" in n.output]
    if kind == "int8":
        quantizer = quantizer_class(
            model,
            bits=8,
            block_size=block_size,
            is_symmetric=True,
            op_types_to_quantize=("MatMul",),
        )
        quantizer.process()
    else:
        wide = _int8_nodes(model, int8_projections)
        quantizer = _int4_pass(model, method, block_size, accuracy_level, head + wide, calibration)
        with _zero_points_packed_per_column():
            quantizer.process()
        # The later passes take what the first left as plain MatMul / Gather: the embedding
        # where the method did only MatMuls, the 8-bit projections, then the head.
        passes = [] if method.startswith("rtn") else [(4, ("Gather",), [])]
        passes += [(8, ("MatMul",), head)] if wide else []
        # The output matrix in 8 bits, as llama.cpp's Q4_K_M keeps it at 6-8: on SmolLM2-135M
        # it cut KL from 0.46 to 0.39 for 14 MB.
        passes += [(head_bits, ("MatMul",), [])] if head and head_bits < 32 else []
        for bits, ops, exclude in passes:
            quantizer = quantizer_class(
                quantizer.model.model if hasattr(quantizer.model, "model") else quantizer.model,
                bits=bits,
                block_size=block_size,
                is_symmetric=True,
                op_types_to_quantize=ops,
                nodes_to_exclude=exclude,
            )
            quantizer.process()
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for f in onnx_dir.iterdir():
            if f.is_file() and not f.name.startswith(MODEL):
                shutil.copy2(f, tmp / f.name)
        quantizer.model.save_model_to_file(str(tmp / MODEL), use_external_data_format=external)
    return out_dir


def check_exportable(config) -> None:
    """EdgekdError unless edgekd and optimum-onnx can export this architecture with a KV cache."""
    architectures.check(config, "onnx")
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager

    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(
            config.model_type, exporter="onnx", library_name="transformers"
        )
    except KeyError:
        tasks = {}
    if "text-generation-with-past" not in tasks:
        raise EdgekdError(
            f"optimum-onnx cannot export model_type '{config.model_type}' "
            f"({', '.join(config.architectures or [])}) for text generation with a KV cache; "
            "drop onnx from the profile's formats or use a supported architecture"
        )


def build_genai(model_dir: Path, out_dir: Path, *, precision: str = "int4") -> Path:
    """onnxruntime-genai's on-device format (genai_config.json + model) from its model builder.

    The builder runs in a child process: it is a command-line tool that sets global state.
    """
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp, tempfile.TemporaryDirectory() as cache:
        cmd = [
            sys.executable, "-m", "onnxruntime_genai.models.builder",
            "-i", str(model_dir), "-o", str(tmp), "-p", precision, "-e", "cpu", "-c", cache,
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not (tmp / "genai_config.json").is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise EdgekdError(f"onnxruntime-genai's builder failed on {model_dir}: {tail[0]}")
        (tmp / "tokenizer.model").unlink(missing_ok=True)
    return out_dir
