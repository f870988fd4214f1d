"""Which decoder layers of the embedded teacher can go? Contiguous blocks versus even spacing.

Measures, on a few fixed calibration texts, the mean KL(full || pruned) over every next-token
position (temperature 1) for dropping each contiguous block of N layers, and for keeping layers
evenly spaced instead (Minitron; Gromov et al., "The Unreasonable Ineffectiveness of the Deeper
Layers"). Runs on CPU in about a minute:

    python bench/prune_layers.py [--drop 10 15]
"""

import argparse
import time

from edgekd.models import (
    block_drop_scores,
    kept_layers_kld,
    load_model,
    load_tokenizer,
    resolve_source,
)

# Mixed registers (chat, prose, code, arithmetic, lists) so no single style decides the ranking.
CALIBRATION_TEXTS = [
    "The water cycle describes how water moves between the oceans, the air and the land. Heat "
    "from the sun evaporates water from seas and lakes; the vapour rises, cools and condenses "
    "into clouds, and falls back as rain or snow. Rivers and groundwater carry it to the sea.",
    "Q: What is the capital of France?\nA: The capital of France is Paris. It lies on the Seine "
    "river in the north of the country and is known for the Eiffel Tower and the Louvre museum.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n\n\nprint([fibonacci(i) for i in range(10)])\n",
    "To make a cup of tea, boil fresh water and pour it over the tea bag or leaves. Let it steep "
    "for three to five minutes, depending on how strong you like it, then remove the leaves. "
    "Add milk, sugar or lemon to taste.",
    "If a train travels 60 kilometres in one hour, how far does it travel in two and a half "
    "hours at the same speed? It travels 60 times 2.5, which is 150 kilometres.",
    "Dear Maria,\nThank you for your letter. I am glad to hear that you enjoyed your holiday in "
    "Portugal. We have had a lot of rain here, but the garden looks greener than ever. I hope "
    "we can meet next month.\nBest wishes,\nTom",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide "
    "to produce glucose and oxygen. It takes place mainly in the leaves, inside small structures "
    "called chloroplasts that contain the green pigment chlorophyll.",
    "Shopping list for the week: eggs, bread, milk, two kilos of potatoes, onions, carrots, "
    "a bag of rice, olive oil, coffee, apples and bananas. Remember to bring the reusable bags.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="embedded")
    parser.add_argument("--drop", type=int, nargs="+", default=[10, 15])
    args = parser.parse_args()

    src = resolve_source(args.teacher, role="teacher")
    tok = load_tokenizer(src)
    model = load_model(src)
    batches = []
    for text in CALIBRATION_TEXTS:
        ids = tok(text, return_tensors="pt").input_ids
        batches.append({"input_ids": ids, "labels": ids.clone()})
    n_layers = model.config.num_hidden_layers
    n_targets = sum(b["input_ids"].shape[1] - 1 for b in batches)
    print(f"teacher {src.describe()}: {n_layers} layers")
    print(f"calibration: {len(batches)} texts, {n_targets} target tokens, KL at temperature 1")

    for n_drop in args.drop:
        t0 = time.time()
        scores = block_drop_scores(model, batches, n_drop)
        best_start, best = min(scores, key=lambda s: s[1])
        worst_start, worst = max(scores, key=lambda s: s[1])
        n_keep = n_layers - n_drop
        even = sorted({round(i * (n_layers - 1) / (n_keep - 1)) for i in range(n_keep)})
        even_kld = kept_layers_kld(model, batches, even)
        print(f"\ndrop {n_drop} of {n_layers} ({time.time() - t0:.0f}s)")
        print("  kld by block start: " + " ".join(f"{s}:{k:.2f}" for s, k in scores))
        print(
            f"  best contiguous : layers {best_start}-{best_start + n_drop - 1} dropped, "
            f"kld {best:.3f}"
        )
        print(
            f"  worst contiguous: layers {worst_start}-{worst_start + n_drop - 1} dropped, "
            f"kld {worst:.3f}"
        )
        print(f"  evenly spaced   : keep {even}, kld {even_kld:.3f}")


if __name__ == "__main__":
    main()
