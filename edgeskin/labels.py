"""Label sets: the seven HAM10000 classes (default) or benign vs malignant.

Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

HAM10000_CODES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")

CLASS_NAMES: dict[str, str] = {
    "akiec": "actinic keratoses / intraepithelial carcinoma (Bowen)",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesions",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevi",
    "vasc": "vascular lesions",
    "benign": "benign lesion (bkl, df, nv, vasc)",
    "malignant": "malignant or pre-malignant lesion (mel, bcc, akiec)",
}

#: Diagnoses counted as malignant in the published binary ResNet50 work.
MALIGNANT_CODES: frozenset[str] = frozenset({"mel", "bcc", "akiec"})


@dataclass(frozen=True)
class LabelSet:
    """An ordered set of class codes, and how HAM10000 diagnoses map onto it."""

    name: str
    codes: tuple[str, ...]
    #: diagnosis code (dx) -> class code of this label set
    mapping: tuple[tuple[str, str], ...]

    @property
    def num_classes(self) -> int:
        return len(self.codes)

    def index(self, code: str) -> int:
        return self.codes.index(code)

    def encode(self, dx: str) -> int:
        """Class index of a HAM10000 diagnosis code (``dx``) in this label set."""
        mapped = dict(self.mapping).get(dx.strip().lower())
        if mapped is None:
            raise ConfigError(
                f"unknown label {dx!r} for label set {self.name!r}",
                f"known diagnosis codes: {', '.join(sorted(dict(self.mapping)))}",
            )
        return self.codes.index(mapped)

    def full_name(self, code: str) -> str:
        return CLASS_NAMES.get(code, code)

    @property
    def positive(self) -> str:
        """The class whose sensitivity matters most: melanoma, or malignant."""
        return "mel" if "mel" in self.codes else "malignant"

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "codes": list(self.codes)}


HAM10000 = LabelSet("ham10000", HAM10000_CODES, tuple((c, c) for c in HAM10000_CODES))
BINARY = LabelSet(
    "binary",
    ("benign", "malignant"),
    tuple((c, "malignant" if c in MALIGNANT_CODES else "benign") for c in HAM10000_CODES),
)

LABEL_SETS: dict[str, LabelSet] = {"ham10000": HAM10000, "binary": BINARY}


def get_label_set(name: str) -> LabelSet:
    try:
        return LABEL_SETS[name.lower()]
    except KeyError:
        raise ConfigError(
            f"unknown label set {name!r}", f"choose one of: {', '.join(LABEL_SETS)}"
        ) from None
