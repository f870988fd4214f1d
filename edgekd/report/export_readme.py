"""The short README.md each export folder carries: how to load its artifacts as they are."""

from __future__ import annotations

from edgekd.config import Profile


def gguf_readme(files: list[str], profile: Profile) -> str:
    main = files[0]
    lines = [
        "# GGUF export",
        "",
        f"Built by edgekd for the `{profile.name}` profile ({profile.description}).",
        "",
        "| file | what it is |",
        "|---|---|",
    ]
    for name in files:
        kind = "full-precision reference" if "F16" in name else "quantized for the device"
        lines.append(f"| `{name}` | {kind}; tokenizer and chat template inside |")
    lines += [
        "",
        "llama.cpp's command line:",
        "",
        f"    llama-cli -m {main} -cnv -t {profile.threads} -c {profile.context_length}",
        "",
        "llama-cpp-python:",
        "",
        "    from llama_cpp import Llama",
        f'    llm = Llama("{main}", n_ctx={profile.context_length}, n_threads={profile.threads})',
        '    out = llm.create_chat_completion([{"role": "user", "content": "Hello!"}])',
        '    print(out["choices"][0]["message"]["content"])',
        "",
        "The file is self-contained: no other file is needed. `report.json` beside it holds the",
        "tokenizer and logit parity with the torch model and the held-out quality of each file.",
        "",
    ]
    return "\n".join(lines)


def onnx_readme(folders: list[str], profile: Profile) -> str:
    lines = [
        "# ONNX export",
        "",
        f"Built by edgekd for the `{profile.name}` profile ({profile.description}).",
        "",
        "| folder | what it is |",
        "|---|---|",
    ]
    decoders = [f for f in folders if not f.startswith("genai")]
    for name in decoders:
        lines.append(f"| `{name}/` | `model.onnx` (+ external data), `config.json`, tokenizer |")
    genai = [f for f in folders if f.startswith("genai")]
    for name in genai:
        lines.append(f"| `{name}/` | onnxruntime-genai's format: `genai_config.json`, model |")
    main = decoders[-1]
    lines += [
        "",
        "Each folder is a decoder with a KV cache (inputs `input_ids`, `attention_mask`,",
        "`position_ids`, `past_key_values.*`; outputs `logits`, `present.*`), loadable as it is:",
        "",
        "    import onnxruntime as ort",
        f'    session = ort.InferenceSession("{main}/model.onnx")',
        "",
        "or with optimum's generation loop:",
        "",
        "    from optimum.onnxruntime import ORTModelForCausalLM",
        "    from transformers import AutoTokenizer",
        f'    model = ORTModelForCausalLM.from_pretrained("{main}")',
        f'    tokenizer = AutoTokenizer.from_pretrained("{main}")',
        "",
    ]
    for name in genai:
        lines += [
            "",
            f"`{name}/` runs in onnxruntime-genai, as on a device:",
            "",
            "    import onnxruntime_genai as og",
            f'    model = og.Model("{name}")',
            "    tokenizer = og.Tokenizer(model)",
            "    params = og.GeneratorParams(model)",
            "    generator = og.Generator(model, params)",
            '    generator.append_tokens(tokenizer.encode("<your chat-formatted prompt>"))',
            "    while not generator.is_done():",
            "        generator.generate_next_token()",
        ]
    lines += [
        "",
        "`report.json` beside them holds the logit parity with the torch model and the held-out",
        "quality of each folder.",
        "",
    ]
    return "\n".join(lines)
