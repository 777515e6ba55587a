"""The text prompts of every method, as data (methods.md §1.4, §2.2, §3.5, §4).

Category lists live in :mod:`zsad_jax.data.protocol`; the tables here are keyed by those names.
Sentences are produced in the order of the official code, which matters only for reproducing its
float summation order (the methods average sentence embeddings).
"""

from __future__ import annotations

# ----------------------------------------------------------------------------------------------
# AF-CLIP (Faustinaqq/AF-CLIP @bb7edec, clip/model.py CLIP.insert): two fixed sentences without a
# class name; 12 learnt context vectors are put before their SOS token.

AF_CLIP_STATES = ("without defect.", "with defect.")  # (normal, abnormal)

# ----------------------------------------------------------------------------------------------
# WinCLIP / APRIL-GAN / AnomalyCLIP prompt ensemble, used by AVA-DINO (aqeeelmirza/AVA-DINO
# @a5474a1, utils.py encode_text_with_prompt_ensemble; same lists as zqhang/AnomalyCLIP
# prompt_ensemble.py). "{}" is the raw class name (folder name, underscores kept).

ENSEMBLE_NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ENSEMBLE_ABNORMAL_STATES = (
    "damaged {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
ENSEMBLE_TEMPLATES = (
    "a bad photo of a {}.",
    "a low resolution photo of the {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a photo of my {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a photo of one {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of a large {}.",
    "a blurry photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "a dark photo of a {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)


def _state_sentences(states, templates, name: str) -> list[str]:
    # Official order: for each state, every template (state-major).
    return [template.format(state.format(name)) for state in states for template in templates]


def ensemble_sentences(class_name: str) -> tuple[list[str], list[str]]:
    """class name -> (7 x 35 = 245 normal sentences, 5 x 35 = 175 abnormal sentences)."""
    return (
        _state_sentences(ENSEMBLE_NORMAL_STATES, ENSEMBLE_TEMPLATES, class_name),
        _state_sentences(ENSEMBLE_ABNORMAL_STATES, ENSEMBLE_TEMPLATES, class_name),
    )


# ----------------------------------------------------------------------------------------------
# ACD-CLIP (cockmake/ACD-CLIP @2026067b55f89e17f81d85eeb4f48da729381677, dataset/info.py PROMPTS
# and REAL_NAMES; sentences built in utils.py get_multiple_adapted_single_class_text_embedding).

ACD_CLIP_NORMAL_STATES = ("{}", "a {}", "the {}")
ACD_CLIP_ABNORMAL_STATES = (
    "a damaged {}",
    "a broken {}",
    "a {} with flaw",
    "a {} with defect",
    "a {} with damage",
)
ACD_CLIP_TEMPLATES = ("{}.", "a photo of {}.")

# dataset/info.py REAL_NAMES, transcribed verbatim (typos and capitals included), keyed by the
# official dataset name. Our dataset names: "MVTec" = mvtec_ad, "VisA" = visa, "MPDD" = mpdd,
# "BTAD" = btad; the others are medical / RSDD sets the project does not read.
ACD_CLIP_REAL_NAMES_BY_DATASET: dict[str, dict[str, str]] = {
    "Brain": {"Brain": "scan"},
    "Liver": {"Liver": "scan"},
    "Retina": {"Retina": "scan"},
    "MVTec": {
        "bottle": "dark bottle",
        "cable": "top view of three cables",
        "capsule": "black and orange capsule",
        "carpet": "gray carpet",
        "grid": "metal or plastic mesh",
        "hazelnut": "single brown hazelnut",
        "leather": "brown leather",
        "metal_nut": "metal nut which has four notched edges",
        "pill": "oval white pill with small red speckles and the letters 'FF' engraved",
        "screw": "screw",
        "tile": "speckled tile surface",
        "transistor": "a three-legged transistor placed vertically",
        "toothbrush": "toothbrush head",
        "wood": "wood surface",
        "zipper": "a black zipper",
    },
    "VisA": {
        "candle": "candle",
        "pcb3": "infrared sensor pcb module",
        "capsules": "capsules",
        "pipe_fryum": "pipe-shaped fryum",
        "pcb4": "battery charging pcb module",
        "macaroni2": "scattered yellow macaroni",
        "pcb2": "integrated circuits board",
        "chewinggum": "chewing gum",
        "macaroni1": "orange macaroni",
        "cashew": "cashew nut",
        "fryum": "wheel-shaped fryum snack",
        "pcb1": "dual ultrasonic distance sensor pcb module",
    },
    "Colon_clinicDB": {"Colon_clinicDB": "colon endoscopy image"},
    "Colon_colonDB": {"Colon_colonDB": "colon endoscopy image"},
    "Colon_cvc300": {"CVC-300": "colon endoscopy image"},
    "Colon_Kvasir": {"Kvasir": "colon endoscopy image"},
    "MPDD": {
        "connector": "metal clamps with black adjustment knobs",
        "tubes": "scattered metal objects",
        "metal_plate": "blue rectangular metal plate with a notch on one side",
        "bracket_white": "white, elongated triangular metal bracket with a smooth, matte finish",
        "bracket_brown": (
            "brown L-shaped metal bracket with smooth, glossy finish and multiple mounting holes "
            "along its arms"
        ),
        "bracket_black": (
            "black ornamental metal bracket with spiral design attached to a rectangular frame"
        ),
    },
    "BTAD": {
        "01": (
            "Bright concentric rings in neon yellow and blue tones against a dark blue background, "
            "resembling a stylized wave or energy field radiating outward."
        ),
        "02": "vertical fabric lines in warm, dusty pink and beige tones",
        "03": "oval concentric circular rings in gradient shades of blue and white",
    },
    "RSDD": {"Dent": "Dent", "Crush": "Crush", "Scratch": "Scratch", "Damage": "Damage"},
}


def _flatten(tables: dict[str, dict[str, str]]) -> dict[str, str]:
    flat: dict[str, str] = {}
    for dataset, table in tables.items():
        for name, real in table.items():
            if name in flat and flat[name] != real:
                raise ValueError(f"REAL_NAMES: category {name!r} of {dataset} is defined twice")
            flat[name] = real
    return flat


# Category name -> descriptive name, all datasets merged (no category name is shared).
REAL_NAMES: dict[str, str] = _flatten(ACD_CLIP_REAL_NAMES_BY_DATASET)


def real_name(class_name: str) -> str:
    """ACD-CLIP's descriptive name of a category.

    Unknown categories (the official code asserts instead) fall back to the name with underscores
    replaced by spaces; "object" (the official generic class) stays "object".
    """
    return REAL_NAMES.get(class_name, class_name.replace("_", " "))


def acd_clip_sentences(class_name: str) -> tuple[list[str], list[str]]:
    """category -> (3 x 2 = 6 normal sentences, 5 x 2 = 10 abnormal sentences) of its real name."""
    name = real_name(class_name)
    return (
        _state_sentences(ACD_CLIP_NORMAL_STATES, ACD_CLIP_TEMPLATES, name),
        _state_sentences(ACD_CLIP_ABNORMAL_STATES, ACD_CLIP_TEMPLATES, name),
    )


# ----------------------------------------------------------------------------------------------
# AnomalyCLIP object-agnostic prompts (zqhang/AnomalyCLIP prompt_ensemble.py
# AnomalyCLIP_PromptLearner), the suggested text side of DLVP-CLIP (methods.md §4: a choice, not a
# fact). Each "X" is one token whose embedding is replaced by a learnt vector: with SOS at position
# 0, the learnt vectors occupy positions 1 .. n_ctx. AnomalyCLIP's default n_ctx is 12.

OBJECT_AGNOSTIC_CLASS_NAME = "object"
OBJECT_AGNOSTIC_NORMAL_STATES = ("{}",)
OBJECT_AGNOSTIC_ABNORMAL_STATES = ("damaged {}",)
OBJECT_AGNOSTIC_PLACEHOLDER = "X"
OBJECT_AGNOSTIC_N_CTX = 12


def object_agnostic_prompts(
    n_ctx: int = OBJECT_AGNOSTIC_N_CTX, class_name: str = OBJECT_AGNOSTIC_CLASS_NAME
) -> tuple[str, str]:
    """-> ("X X ... X object.", "X X ... X damaged object.") with ``n_ctx`` placeholders each."""
    if n_ctx < 0:
        raise ValueError(f"object_agnostic_prompts: n_ctx must be >= 0, got {n_ctx}")
    prefix = " ".join([OBJECT_AGNOSTIC_PLACEHOLDER] * n_ctx)
    normal, abnormal = (
        (prefix + " " + state.format(class_name) + ".").lstrip()
        for state in (OBJECT_AGNOSTIC_NORMAL_STATES[0], OBJECT_AGNOSTIC_ABNORMAL_STATES[0])
    )
    return normal, abnormal
