"""The licences of the public data sets edgeskin reads: one record each, shown by ``data fetch``
and written into the provenance of every checkpoint and bundle trained on them.

Standard library only (``data fetch`` and the device runtime import it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class DataLicence:
    """What a user of a data set (and of what is trained on it) must know."""

    dataset: str
    spdx: str
    name: str
    url: str
    attribution: str
    notice: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: HAM10000 as published on Harvard Dataverse (doi:10.7910/DVN/DBW86T).
HAM10000 = DataLicence(
    dataset="HAM10000",
    spdx="CC-BY-NC-4.0",
    name="Creative Commons Attribution-NonCommercial 4.0 International",
    url="https://creativecommons.org/licenses/by-nc/4.0/",
    attribution=("Tschandl, P., Rosendahl, C. & Kittler, H. The HAM10000 dataset, a large collection of "
                 "multi-source dermatoscopic images of common pigmented skin lesions. Sci. Data 5, 180161 (2018); "
                 "https://doi.org/10.7910/DVN/DBW86T"),
    notice=("HAM10000 is licensed CC BY-NC 4.0 (https://creativecommons.org/licenses/by-nc/4.0/): credit "
            "Tschandl et al. 2018, and no commercial use. Checkpoints and bundles trained on it record this "
            "licence in their provenance; whether its terms reach a product built on such a model is a legal "
            "question edgeskin cannot answer: check before any commercial use."),
)

#: ISIC 2018 Task 3: its training images are HAM10000; the challenge publishes its data under CC BY-NC 4.0 too.
ISIC2018 = DataLicence(
    dataset="ISIC 2018 Task 3 (HAM10000)",
    spdx="CC-BY-NC-4.0",
    name=HAM10000.name,
    url=HAM10000.url,
    attribution=("Codella, N. et al. Skin Lesion Analysis Toward Melanoma Detection 2018 (ISIC), "
                 "arXiv:1902.03368; and " + HAM10000.attribution),
    notice=HAM10000.notice.replace("HAM10000 is", "ISIC 2018 Task 3 (HAM10000) is", 1),
)

#: by the layout edgeskin.data detected (Dataset.layout); a plain class-folder layout has no known licence
BY_LAYOUT: dict[str, DataLicence] = {"ham10000": HAM10000, "isic2018": ISIC2018}


def licence_of(layout: str) -> DataLicence | None:
    """The licence of a data set read in ``layout`` (``Dataset.layout``), or None when edgeskin cannot
    know it (your own folder of images: its licence is yours to record)."""
    return BY_LAYOUT.get(str(layout).lower())


def same_licence(stated: str, lic: DataLicence) -> bool:
    """Whether a licence name a source states ("CC BY-NC 4.0", "CC-BY-NC-4.0") is ``lic``."""
    def norm(x: str) -> str:
        return "".join(ch for ch in x.lower() if ch.isalnum())
    return norm(stated) in (norm(lic.spdx), norm(lic.name))


def licence_record(layout: str) -> dict[str, Any] | None:
    """What provenance stores under ``data_licence``: dataset, SPDX id, name, url, attribution, notice."""
    lic = licence_of(layout)
    return None if lic is None else lic.to_dict()
