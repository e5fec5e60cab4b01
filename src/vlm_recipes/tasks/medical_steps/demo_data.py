"""Demo data of medical_steps: synthetic procedures (3 to 5 steps) with small screenshots, written as `steps.csv`."""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .format import dumps_compact
from .native import REQUIRED_COLUMNS, STEPS_FILE

__all__ = ["write_demo_data"]

_SCREEN_SIZE = (192, 144)
_NAMES = ["Ana Ruiz", "Ben Okafor", "Chen Wei", "Dana Levi", "Emil Novak", "Fatima Zahra", "Goran Ilic", "Hana Sato"]
_DOCTORS = ["Dr. Adams", "Dr. Baker", "Dr. Costa", "Dr. Diaz"]
_APPS = ["PACS Viewer", "Reports", "Lab Results", "Scheduler"]
_SERIES = ["T1 AX", "T2 AX", "FLAIR", "DWI"]
_PRESETS = ["Lung", "Bone", "Brain", "Abdomen"]
_REPORTS = ["X-ray", "CT", "MRI", "Ultrasound"]
_TOOLS = ["Ruler", "Angle", "ROI", "Zoom"]
# Each patient has one id and one MRI study, as in a hospital's records: a model can learn the id from the name in the
# goal (a tiny demo model cannot read random digits off a 192x144 screenshot), and the goal names the study by its
# year (each name comes in too few MRI goals for a model to learn its study).
_PATIENT_IDS = {name: f"P-{1000 + 1111 * index}" for index, name in enumerate(_NAMES)}
_MRI_YEARS = {name: 2017 + index for index, name in enumerate(_NAMES)}


@dataclass
class _Screen:
    title: str
    options: list[str]
    chosen: str
    output: dict[str, Any]


def _procedure(kind: int, rng: random.Random) -> tuple[str, list[_Screen]]:
    """One synthetic procedure: the user goal and its screens, the element to act on highlighted on each.

    The last step repeats the patient id, which the goal does not name (it names the patient): the model takes it
    from memory.
    """
    patients = rng.sample(_NAMES, 4)
    name = patients[0]
    patient_id = _PATIENT_IDS[name]
    patient = f"{name} {patient_id}"
    patient_rows = rng.sample([f"{other} {_PATIENT_IDS[other]}" for other in patients], 4)

    def screen(title: str, options: list[str], chosen: str, **output: str) -> _Screen:
        return _Screen(title, options, chosen, output)

    def opening(app: str, area: str) -> list[_Screen]:
        return [
            screen("Launcher", rng.sample(_APPS, 4), app, action="open_app", app=app),
            screen(f"{area} | Patients", patient_rows, patient, action="select_patient", patient_id=patient_id),
        ]

    if kind == 0:
        series = rng.choice(_SERIES)
        year = _MRI_YEARS[name]
        study = f"MRI {year}"
        studies = rng.sample([study, "CT 2016", "XR 2015"], 3)
        goal = f"Load the {series} series of the {year} MRI scan of patient {name}."
        screens = [
            *opening("PACS Viewer", "PACS"),
            screen("PACS | Studies", studies, study, action="choose_study", study=study),
            screen("PACS | Series", rng.sample(_SERIES, 4), series, action="choose_series", series=series),
            screen("PACS | Viewer", ["Load", "Cancel"], "Load", action="load", patient_id=patient_id, series=series),
        ]
    elif kind == 1:
        tool = rng.choice(_TOOLS)
        goal = f"Measure the lesion with the {tool} tool on the CT of patient {name}."
        screens = [
            *opening("PACS Viewer", "PACS"),
            screen("PACS | Tools", rng.sample(_TOOLS, 4), tool, action="select_tool", tool=tool),
            screen("PACS | Measure", ["Save", "Undo"], "Save", action="save", patient_id=patient_id, tool=tool),
        ]
    elif kind == 2:
        report, doctor = rng.choice(_REPORTS), rng.choice(_DOCTORS)
        goal = f"Send the {report} report of patient {name} to {doctor}."
        screens = [
            *opening("Reports", "Reports"),
            screen("Reports | Documents", rng.sample(_REPORTS, 4), report, action="open_report", report=report),
            screen("Reports | Send", _DOCTORS, doctor, action="send", patient_id=patient_id, recipient=doctor),
        ]
    else:
        preset = rng.choice(_PRESETS)
        goal = f"Apply the {preset} window to the CT of patient {name}."
        screens = [
            *opening("PACS Viewer", "PACS"),
            screen("PACS | Window", _PRESETS, preset, action="set_window", patient_id=patient_id, preset=preset),
        ]
    return goal, screens


def _render(screen: _Screen, rng: random.Random):
    """A small screenshot: a title bar, one button per option, the chosen one highlighted. Returns (image, bbox)."""
    from PIL import Image, ImageDraw

    width, height = _SCREEN_SIZE
    shade = rng.randint(-12, 12)
    image = Image.new("RGB", (width, height), (232 + shade // 2, 236 + shade // 2, 242))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, width - 1, 15], fill=(30, 60 + shade, 120))
    draw.text((4, 2), screen.title, fill=(255, 255, 255))
    bbox = None
    for position, label in enumerate(screen.options):
        top = 22 + position * 28
        box = [8, top, width - 9, top + 22]
        if label == screen.chosen:
            draw.rectangle(box, fill=(255, 236, 150), outline=(220, 120, 0), width=2)
            bbox = box
        else:
            draw.rectangle(box, fill=(255, 255, 255), outline=(150, 150, 160))
        draw.text((14, top + 5), label, fill=(20, 20, 20))
    return image, bbox


def write_demo_data(output_dir: Path, num: int, seed: int) -> None:
    """Write `steps.csv` and `images/` with `num` synthetic procedures (tasks), the same bytes for the same seed."""
    if num < 1:
        raise ValueError(f"`num`={num}: medical_steps demo data needs at least one task.")
    rng = random.Random(seed)
    images = output_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for task_number in range(1, num + 1):
        goal, screens = _procedure((task_number - 1) % 4, rng)
        for step_number, screen in enumerate(screens, start=1):
            image_id = f"task{task_number:04d}_step{step_number:02d}.png"
            image, bbox = _render(screen, rng)
            temporary = images / f".{image_id}.tmp"
            image.save(temporary, format="PNG")
            os.replace(temporary, images / image_id)
            grounding = {"bbox": bbox, "label": screen.chosen}
            records.append([task_number, image_id, goal, dumps_compact(screen.output), dumps_compact(grounding)])
    temporary = output_dir / f".{STEPS_FILE}.tmp"
    with temporary.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(REQUIRED_COLUMNS)
        writer.writerows(records)
    os.replace(temporary, output_dir / STEPS_FILE)
