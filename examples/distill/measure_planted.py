"""PH-Reg on models with planted artifacts, against their artifact-free oracle: the numbers in docs/distillation.md.

For each planted family (``register_adapter.testing.make_artifact_model``, 32 px, 2 px patches, 6 blocks) it
measures on 16 held-out scenes

* the share of patch tokens far from the oracle (cosine < 0.5 between final normed patch tokens) for the raw model,
  its denoised teacher (10 views) and the distilled student;
* the share of high-norm patch tokens in the residual stream (norm > 5x the layer's median patch norm, the largest
  share over the block outputs) before and after;

after distilling with the settings of the test (16 training scenes, batch 8, ``--steps`` steps, learning rate 2e-2
decaying to 1e-3, target cache): :func:`register_adapter.testing.distill_planted`. About a minute per family on a 2-core CPU; nothing is downloaded.

    python examples/distill/measure_planted.py
    python examples/distill/measure_planted.py --families clip clip-vision --steps 120
"""

import argparse

import datasets

from register_adapter.testing import PLANTABLE_FAMILIES, distill_planted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=PLANTABLE_FAMILIES, choices=PLANTABLE_FAMILIES)
    parser.add_argument("--steps", type=int, default=200)
    options = parser.parse_args()
    datasets.disable_progress_bars()
    print(
        "| family | far from oracle: raw | denoised teacher | student | drop | high-norm: before | after | drop | time |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for family in options.families:
        r = distill_planted(family, steps=options.steps, measure_teacher=True)
        print(
            f"| {family} | {r.raw_far:.2%} | {r.teacher_far:.2%} | {r.student_far:.2%} | {r.far_drop:.0%} | "
            f"{r.high_before:.2%} | {r.high_after:.2%} | {r.high_drop:.0%} | {r.seconds:.0f} s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
