"""The chess task: FEN <-> JSON, metrics on hand-computed cases, loading with bad rows, demo data, and pair import."""

import io
import json
import math
import random

import chess
import pytest
from PIL import Image

from vlm_recipes.data.errors import BadRow, DataError
from vlm_recipes.data.rows import BadRowReport
from vlm_recipes.tasks import get_task
from vlm_recipes.tasks.chess.demo_data import random_position
from vlm_recipes.tasks.chess.format import (
    fen_to_position_json,
    format_position,
    placement_squares,
    position_json_to_fen,
)
from vlm_recipes.tasks.chess.metrics import aggregate_position_scores, position_scores
from vlm_recipes.tasks.chess.native import PROMPT
from vlm_recipes.tasks.chess.pairs import create_vlm_dataset

START = chess.STARTING_FEN
AFTER_E4 = "rnbqkbnr/pppppppp/8/8/4P3/8/PPPP1PPP/RNBQKBNR b KQkq - 0 1"
# Black just played d7-d5 next to the e5 pawn: en passant is on.
EN_PASSANT = "rnbqkbnr/ppp1pppp/8/3pP3/8/8/PPPP1PPP/RNBQKBNR w KQkq d6 0 3"
ENDGAME = "8/8/4k3/8/2R5/8/5K2/8 b - - 17 64"


def small_png() -> bytes:
    """A valid 2x2 PNG: loading reads every image's header, so a placeholder file must be a real image."""
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, format="PNG")
    return buffer.getvalue()


def answer(fen: str) -> str:
    return format_position(fen_to_position_json(fen))


def move_piece(fen: str, from_square: str, to_square: str) -> str:
    """The answer text of `fen` with one piece moved (no legality, no metadata change): a hand-made wrong board."""
    position = fen_to_position_json(fen)
    for piece in position["pieces"]:
        if piece["square"] == from_square:
            piece["square"] = to_square
    return format_position(position)


class TestFenConversion:
    @pytest.mark.parametrize("fen", [START, AFTER_E4, EN_PASSANT, ENDGAME, "r3k2r/8/8/8/8/8/8/R3K2R w Kq - 5 40"])
    def test_round_trip(self, fen):
        assert position_json_to_fen(fen_to_position_json(fen)) == fen
        assert position_json_to_fen(json.loads(answer(fen))) == fen

    def test_round_trip_random_legal_positions(self):
        rng = random.Random(7)
        for _ in range(50):
            fen = random_position(rng).fen()
            assert position_json_to_fen(fen_to_position_json(fen)) == fen

    def test_hand_computed_endgame(self):
        assert fen_to_position_json(ENDGAME) == {
            "pieces": [
                {"square": "f2", "color": "white", "type": "king"},
                {"square": "c4", "color": "white", "type": "rook"},
                {"square": "e6", "color": "black", "type": "king"},
            ],
            "metadata": {
                "side_to_move": "black",
                "castling": [],
                "en_passant": None,
                "halfmove_clock": 17,
                "fullmove_number": 64,
            },
        }

    def test_pieces_sorted_a1_to_h8_rank_by_rank(self):
        squares = [piece["square"] for piece in fen_to_position_json(START)["pieces"]]
        assert squares[:9] == ["a1", "b1", "c1", "d1", "e1", "f1", "g1", "h1", "a2"]
        assert squares[-1] == "h8" and len(squares) == 32

    def test_metadata_of_en_passant_and_castling(self):
        metadata = fen_to_position_json(EN_PASSANT)["metadata"]
        assert metadata["en_passant"] == "d6" and metadata["side_to_move"] == "white"
        assert metadata["castling"] == ["white_kingside", "white_queenside", "black_kingside", "black_queenside"]

    def test_compact_text(self):
        text = answer(START)
        assert " " not in text
        assert text.startswith('{"pieces":[{"square":"a1","color":"white","type":"rook"},')
        assert text.endswith(
            '"metadata":{"side_to_move":"white","castling":["white_kingside","white_queenside",'
            '"black_kingside","black_queenside"],"en_passant":null,"halfmove_clock":0,'
            '"fullmove_number":1}}'
        )

    def test_castling_order_is_canonical(self):
        position = fen_to_position_json("r3k2r/8/8/8/8/8/8/R3K2R w qK - 0 1")
        assert position["metadata"]["castling"] == ["white_kingside", "black_queenside"]
        assert position_json_to_fen(position).split()[2] == "Kq"

    def test_placement_squares(self):
        squares = placement_squares(ENDGAME.split()[0])
        assert len(squares) == 64 and squares.count(".") == 61
        assert (squares[chess.C4], squares[chess.F2], squares[chess.E6]) == ("R", "K", "k")

    @pytest.mark.parametrize(
        ("fen", "message"),
        [
            ("8/8/8/8/8/8/8/8 w - -", "6 space-separated fields"),
            ("8/8/8/8/8/8/8 w - - 0 1", "7 ranks"),
            ("9/8/8/8/8/8/8/8 w - - 0 1", "unknown character '9'"),
            ("7/8/8/8/8/8/8/8 w - - 0 1", "covers 7 files"),
            ("8p/8/8/8/8/8/8/8 w - - 0 1", "past the h-file"),
            ("8/8/8/8/8/8/8/8 x - - 0 1", "side to move"),
            ("8/8/8/8/8/8/8/8 w KK - 0 1", "castling"),
            ("8/8/8/8/8/8/8/8 w - e4 0 1", "en passant"),
            ("8/8/8/8/8/8/8/8 w - - -1 1", "halfmove"),
            ("8/8/8/8/8/8/8/8 w - - 0 0", "fullmove"),
        ],
    )
    def test_malformed_fen_raises(self, fen, message):
        with pytest.raises(ValueError, match=message):
            fen_to_position_json(fen)

    @pytest.mark.parametrize(
        ("edit", "message"),
        [
            (lambda p: p.update(extra=1), "unknown \\['extra'\\]"),
            (lambda p: p["pieces"].append({"square": "a1", "color": "white", "type": "king"}), "holds two pieces"),
            (lambda p: p["pieces"][0].update(square="i9"), "unknown square"),
            (lambda p: p["pieces"][0].update(square=["a1"]), "unknown square"),
            (lambda p: p["pieces"][0].update(color="red"), "color"),
            (lambda p: p["pieces"][0].update(type="dragon"), "type must be"),
            (lambda p: p["pieces"][0].pop("type"), "missing \\['type'\\]"),
            (lambda p: p["metadata"].update(side_to_move="w"), "side_to_move"),
            (lambda p: p["metadata"].update(castling="KQkq"), "castling"),
            (lambda p: p["metadata"].update(castling=[{"a": 1}]), "castling"),
            (lambda p: p["metadata"].update(en_passant="e4"), "en passant"),
            (lambda p: p["metadata"].update(halfmove_clock=False), "halfmove_clock"),
            (lambda p: p["metadata"].update(fullmove_number=0), "fullmove_number"),
            (lambda p: p.update(pieces="e4"), "must be a list"),
        ],
    )
    def test_malformed_position_json_raises(self, edit, message):
        position = fen_to_position_json(START)
        edit(position)
        with pytest.raises(ValueError, match=message):
            position_json_to_fen(position)


class TestPositionScores:
    def test_perfect(self):
        target = answer(START)
        assert position_scores(target, target) == {
            "valid_json": 1.0,
            "valid_position": 1.0,
            "exact_json_match": 1.0,
            "fen_accuracy": 1.0,
            "square_accuracy": 1.0,
            "occupied_square_accuracy": 1.0,
            "exact_board_match": 1.0,
        }

    def test_one_piece_moved(self):
        # The e2 pawn drawn on e4: e2 and e4 wrong, the other 62 squares right; 31 of the 32 occupied squares right.
        scores = position_scores(move_piece(START, "e2", "e4"), answer(START))
        assert scores["square_accuracy"] == 62 / 64
        assert scores["occupied_square_accuracy"] == 31 / 32
        assert (scores["exact_board_match"], scores["fen_accuracy"], scores["exact_json_match"]) == (0.0, 0.0, 0.0)
        assert (scores["valid_json"], scores["valid_position"]) == (1.0, 1.0)

    def test_right_board_wrong_metadata(self):
        # Only the side to move differs: the board metrics are perfect, the whole answer is not.
        scores = position_scores(answer(START.replace(" w ", " b ")), answer(START))
        assert (scores["square_accuracy"], scores["exact_board_match"], scores["fen_accuracy"]) == (1.0, 1.0, 1.0)
        assert scores["exact_json_match"] == 0.0

    def test_right_board_malformed_metadata(self):
        # `pieces` is readable, so the board counts; no FEN can be built, so FEN accuracy and validity do not.
        position = fen_to_position_json(START)
        position["metadata"] = {"turn": "white"}
        scores = position_scores(json.dumps(position), answer(START))
        assert (scores["square_accuracy"], scores["exact_board_match"]) == (1.0, 1.0)
        assert (scores["fen_accuracy"], scores["valid_position"], scores["exact_json_match"]) == (0.0, 0.0, 0.0)
        assert scores["valid_json"] == 1.0

    def test_invalid_position(self):
        # The black king removed: well-formed JSON, a FEN with the right placement elsewhere, but no legal position.
        position = fen_to_position_json(ENDGAME)
        position["pieces"] = [
            piece for piece in position["pieces"] if piece["type"] != "king" or piece["color"] == "white"
        ]
        scores = position_scores(format_position(position), answer(ENDGAME))
        assert scores["valid_json"] == 1.0 and scores["valid_position"] == 0.0
        assert scores["square_accuracy"] == 63 / 64 and scores["occupied_square_accuracy"] == 2 / 3
        assert scores["fen_accuracy"] == 0.0

    @pytest.mark.parametrize("prediction", ['{"pieces": [', "The board shows", ""])
    def test_unparseable_counts_as_all_squares_wrong(self, prediction):
        scores = position_scores(prediction, answer(START))
        assert scores == {key: 0.0 for key in scores}

    @pytest.mark.parametrize("prediction", ["[]", "null", '{"pieces": 3}', '{"pieces": [{"square": "a1"}]}'])
    def test_json_but_not_a_position(self, prediction):
        scores = position_scores(prediction, answer(START))
        assert scores["valid_json"] == 1.0
        assert scores["square_accuracy"] == 0.0
        assert {key: value for key, value in scores.items() if key != "valid_json"} == {
            key: 0.0 for key in scores if key != "valid_json"
        }

    def test_exact_json_compares_types_and_ignores_spacing(self):
        target = answer(ENDGAME)
        assert position_scores(json.dumps(json.loads(target), indent=2), target)["exact_json_match"] == 1.0
        # halfmove 0 as `false` (equal in Python, not in JSON) and as 0.0: not exact, and no longer a valid FEN.
        for wrong in ("false", "0.0"):
            text = answer(ENDGAME.replace(" 17 ", " 0 ")).replace('"halfmove_clock":0', f'"halfmove_clock":{wrong}')
            scores = position_scores(text, answer(ENDGAME.replace(" 17 ", " 0 ")))
            assert scores["exact_json_match"] == 0.0 and scores["valid_position"] == 0.0
            assert scores["exact_board_match"] == 1.0

    def test_piece_order_matters_for_json_only(self):
        position = fen_to_position_json(ENDGAME)
        position["pieces"].reverse()
        scores = position_scores(json.dumps(position), answer(ENDGAME))
        assert scores["exact_json_match"] == 0.0
        assert (scores["fen_accuracy"], scores["exact_board_match"], scores["valid_position"]) == (1.0, 1.0, 1.0)


class TestAggregate:
    def test_hand_computed(self):
        target = answer(START)
        scores = [
            position_scores(target, target),
            position_scores(move_piece(START, "e2", "e4"), target),
            position_scores("not json", target),
            position_scores("{}", target),
        ]
        metrics = aggregate_position_scores(scores)
        assert metrics["valid_json_rate"] == 3 / 4
        assert metrics["valid_position_rate"] == 2 / 4
        assert metrics["exact_json_match"] == 1 / 4
        assert metrics["fen_accuracy"] == 1 / 4
        assert metrics["exact_board_match"] == 1 / 4
        assert metrics["square_accuracy"] == pytest.approx((64 + 62 + 0 + 0) / 256)
        assert metrics["occupied_square_accuracy"] == pytest.approx((32 + 31) / 128)
        assert metrics["num_examples"] == 4.0

    def test_empty_split(self):
        metrics = aggregate_position_scores([])
        assert math.isnan(metrics["square_accuracy"]) and metrics["num_examples"] == 0.0

    def test_task_hooks_use_the_target_text(self):
        task = get_task("chess")
        target = answer(ENDGAME)
        # A row as evaluation sees it (from the datasets.Dataset, without `fen`).
        row = {"id": "x", "messages": [{"role": "assistant", "content": [{"type": "text", "text": target}]}]}
        assert task.target(row) == target
        scores = [task.score(target, task.target(row), row), task.score("", task.target(row), row)]
        metrics = task.aggregate(scores, [row, row])
        assert metrics["exact_board_match"] == 0.5 and metrics["valid_json_rate"] == 0.5


def native_row(image="img.png", fen=START, **overrides):
    row = {
        "id": "chess_000001",
        "image": image,
        "conversations": [
            {"from": "user", "value": f"<image>\n{PROMPT}"},
            {"from": "assistant", "value": answer(fen)},
        ],
    }
    row.update(overrides)
    return row


class TestLoadRows:
    def write(self, tmp_path, rows, split="train"):
        (tmp_path / "img.png").write_bytes(small_png())  # its header is read at load time, its pixels later
        (tmp_path / f"{split}.json").write_text(json.dumps(rows))

    def test_good_row(self, tmp_path):
        self.write(tmp_path, [native_row(fen=ENDGAME)])
        task = get_task("chess")
        assert task.split_exists(tmp_path, "train") and not task.split_exists(tmp_path, "val")
        [row] = task.load_rows(tmp_path, "train", tmp_path, BadRowReport("error"))
        assert row["id"] == "chess_000001"
        assert row["images"] == [str(tmp_path / "img.png")]
        assert row["fen"] == ENDGAME
        assert row["messages"] == [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer(ENDGAME)}]},
        ]
        assert task.target(row) == answer(ENDGAME)

    def test_marker_position_and_llava_roles(self, tmp_path):
        row = native_row()
        row["conversations"] = [
            {"from": "human", "value": "Look:\n<image>\nDescribe it."},
            {"from": "gpt", "value": answer(START)},
        ]
        self.write(tmp_path, [row])
        [loaded] = get_task("chess").load_rows(tmp_path, "train", tmp_path, BadRowReport("error"))
        assert loaded["messages"][0]["content"] == [
            {"type": "text", "text": "Look:"},
            {"type": "image"},
            {"type": "text", "text": "Describe it."},
        ]

    def test_bad_row_error_names_file_and_row(self, tmp_path):
        self.write(tmp_path, [native_row(), native_row(image="missing.png")])
        with pytest.raises(BadRow, match=r"train.json, row 1 \(id chess_000001\): image file .*missing.png not found"):
            get_task("chess").load_rows(tmp_path, "train", tmp_path, BadRowReport("error"))

    def test_skip_counts_every_bad_row(self, tmp_path):
        def with_turns(user, assistant):
            return native_row(
                conversations=[{"from": "user", "value": user}, {"from": "assistant", "value": assistant}]
            )

        no_image = native_row()
        del no_image["image"]
        bad_position = fen_to_position_json(START)
        bad_position["pieces"][0]["square"] = "z9"
        rows = [
            native_row(),  # 0: good
            ["not", "an", "object"],  # 1
            no_image,  # 2
            native_row(conversations="hello"),  # 3
            with_turns(f"<image><image>\n{PROMPT}", answer(START)),  # 4: two markers
            with_turns(PROMPT, answer(START)),  # 5: no marker
            with_turns(f"<image>\n{PROMPT}", '{"pieces": ['),  # 6: not JSON
            with_turns(f"<image>\n{PROMPT}", json.dumps(bad_position)),  # 7: JSON, not a position
            native_row(image="missing.png"),  # 8
            native_row(conversations=[{"from": "assistant", "value": "x"}, {"from": "user", "value": "y"}]),  # 9
            native_row(fen=ENDGAME),  # 10: good
        ]
        self.write(tmp_path, rows)
        report = BadRowReport("skip")
        loaded = get_task("chess").load_rows(tmp_path, "train", tmp_path, report)
        assert [row["fen"] for row in loaded] == [START, ENDGAME]
        assert [error.row for error in report.skipped] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
        assert all(error.file == str(tmp_path / "train.json") for error in report.skipped)
        reasons = [error.reason for error in report.skipped]
        assert "expected a JSON object" in reasons[0]
        assert "missing key `image`" in reasons[1]
        assert "two turns" in reasons[2]
        assert "found 2" in reasons[3] and "found 0" in reasons[4]
        assert "not JSON" in reasons[5]
        assert "not a valid position JSON: piece 0: unknown square 'z9'" in reasons[6]
        assert "not found" in reasons[7]
        assert "turn 0" in reasons[8]
        assert "skipped 9 malformed row(s)" in report.summary()

    def test_unreadable_file_raises(self, tmp_path):
        task = get_task("chess")
        with pytest.raises(FileNotFoundError):
            task.load_rows(tmp_path, "train", tmp_path, BadRowReport("skip"))
        (tmp_path / "train.json").write_text("[{")
        with pytest.raises(ValueError, match="not valid JSON"):
            task.load_rows(tmp_path, "train", tmp_path, BadRowReport("skip"))
        (tmp_path / "train.json").write_text('{"rows": []}')
        with pytest.raises(ValueError, match="must hold a JSON list"):
            task.load_rows(tmp_path, "train", tmp_path, BadRowReport("skip"))

    def test_file_errors_are_one_line_data_errors_naming_the_line(self, tmp_path):
        task, file = get_task("chess"), tmp_path / "train.json"
        file.write_text('[\n  {"id": 1},\n  {"id": 2\n')  # cut short after its third line
        with pytest.raises(DataError, match=r"train.json, line 4: not valid JSON \(Expecting ',' delimiter"):
            task.load_rows(tmp_path, "train", tmp_path, BadRowReport("skip"))
        file.write_bytes(b'[\n  {"id": "caf\xe9"}\n]\n')
        with pytest.raises(DataError, match=r"train.json, line 2: not UTF-8 \(byte 0xe9 at column 14\)"):
            task.load_rows(tmp_path, "train", tmp_path, BadRowReport("skip"))
        file.write_text("\n")
        with pytest.raises(DataError, match=r"train.json: the file is empty"):
            task.load_rows(tmp_path, "train", tmp_path, BadRowReport("skip"))


class TestMakeData:
    def test_splits_images_and_loading(self, tmp_path):
        from PIL import Image

        task = get_task("chess")
        task.make_data(tmp_path, 10, seed=3)
        counts = {
            split: len(json.loads((tmp_path / f"{split}.json").read_text())) for split in ("train", "val", "test")
        }
        assert counts == {"train": 8, "val": 1, "test": 1}
        assert not list(tmp_path.glob(".*.tmp"))
        first = json.loads((tmp_path / "train.json").read_text())[0]
        assert first["id"] == "chess_000001" and first["image"] == "train/images/train_000001.png"
        assert first["conversations"][0]["value"] == f"<image>\n{PROMPT}"
        with Image.open(tmp_path / first["image"]) as image:
            assert image.size == (128, 128)
        ids = []
        for split in ("train", "val", "test"):
            for row in task.load_rows(tmp_path, split, tmp_path, BadRowReport("error")):
                assert chess.Board(row["fen"]).is_valid()
                ids.append(row["id"])
        assert ids == [f"chess_{number:06d}" for number in range(1, 11)]

    def test_deterministic_for_a_seed(self, tmp_path):
        task = get_task("chess")
        for name, seed in (("a", 5), ("b", 5), ("c", 6)):
            task.make_data(tmp_path / name, 10, seed=seed)
        files = sorted(path.relative_to(tmp_path / "a") for path in (tmp_path / "a").rglob("*") if path.is_file())
        assert len(files) == 13  # 3 split files and 10 images
        for relative in files:
            assert (tmp_path / "a" / relative).read_bytes() == (tmp_path / "b" / relative).read_bytes(), relative
        assert (tmp_path / "a" / "train.json").read_text() != (tmp_path / "c" / "train.json").read_text()

    def test_rows_survive_the_dataset_and_score_perfectly(self, tmp_path):
        from vlm_recipes.data.rows import build_dataset

        task = get_task("chess")
        task.make_data(tmp_path, 10, seed=0)
        dataset = build_dataset(task.load_rows(tmp_path, "train", tmp_path, BadRowReport("error")))
        row = dataset[0]  # what evaluation sees: decoded image, the task's extra fields kept
        assert row["images"][0].size == (128, 128)
        assert fen_to_position_json(row["fen"]) == json.loads(task.target(row))
        target = task.target(row)
        metrics = task.aggregate([task.score(target, target, row)], [row])
        assert metrics["exact_json_match"] == 1.0 and metrics["valid_position_rate"] == 1.0

    def test_too_few(self, tmp_path):
        with pytest.raises(ValueError, match="at least 3"):
            get_task("chess").make_data(tmp_path, 2, seed=0)


class TestCreateVlmDataset:
    def make_pairs(self, folder, count):
        from PIL import Image

        folder.mkdir()
        rng = random.Random(0)
        fens = {}
        for number in range(count):
            fen = random_position(rng).fen()
            Image.new("RGB", (8, 8), (number, 0, 0)).save(folder / f"board{number:02d}.png")
            (folder / f"board{number:02d}.fen").write_text(f"\n{fen}\n")
            fens[f"board{number:02d}"] = fen
        return fens

    def test_folder_of_pairs(self, tmp_path):
        fens = self.make_pairs(tmp_path / "pairs", 10)
        counts = create_vlm_dataset(tmp_path / "pairs", tmp_path / "out", seed=1)
        assert counts == {"train": 8, "val": 1, "test": 1}
        task = get_task("chess")
        loaded = [
            row
            for split in counts
            for row in task.load_rows(tmp_path / "out", split, tmp_path / "out", BadRowReport())
        ]
        assert sorted(row["fen"] for row in loaded) == sorted(fens.values())
        # Each copied image is the one its FEN was written beside (told apart by their red channel).
        from PIL import Image

        for row in loaded:
            with Image.open(row["images"][0]) as image:
                assert fens[f"board{image.getpixel((0, 0))[0]:02d}"] == row["fen"]
        assert [row["id"] for row in loaded] == [f"chess_{number:06d}" for number in range(1, 11)]

    def test_deterministic_shuffle_and_max_samples(self, tmp_path):
        self.make_pairs(tmp_path / "pairs", 10)
        create_vlm_dataset(tmp_path / "pairs", tmp_path / "a", seed=2)
        create_vlm_dataset(tmp_path / "pairs", tmp_path / "b", seed=2)
        assert (tmp_path / "a" / "train.json").read_text() == (tmp_path / "b" / "train.json").read_text()
        counts = create_vlm_dataset(tmp_path / "pairs", tmp_path / "c", max_samples=4, split_ratios=(0.5, 0.25, 0.25))
        assert counts == {"train": 2, "val": 1, "test": 1}

    def test_list_of_pairs(self, tmp_path):
        image = tmp_path / "board.jpg"
        image.write_bytes(b"jpeg")
        counts = create_vlm_dataset([(image, ENDGAME)], tmp_path / "out", split_ratios=(1.0, 0.0, 0.0))
        assert counts == {"train": 1, "val": 0, "test": 0}
        rows = json.loads((tmp_path / "out" / "train.json").read_text())
        assert rows[0]["image"] == "train/images/train_000001.jpg"
        assert json.loads((tmp_path / "out" / "val.json").read_text()) == []

    def test_missing_partner_is_an_error(self, tmp_path):
        self.make_pairs(tmp_path / "pairs", 2)
        (tmp_path / "pairs" / "board00.fen").unlink()
        (tmp_path / "pairs" / "stray.fen").write_text(START)
        with pytest.raises(
            ValueError,
            match=r"images without a .fen: \['board00'\], .fen files without an image: "
            r"\['stray'\]",
        ):
            create_vlm_dataset(tmp_path / "pairs", tmp_path / "out")

    def test_malformed_fen_names_its_file(self, tmp_path):
        self.make_pairs(tmp_path / "pairs", 2)
        (tmp_path / "pairs" / "board01.fen").write_text("rnbqkbnr/8 w - - 0 1")
        with pytest.raises(ValueError, match=r"board01.fen: malformed FEN .*2 ranks"):
            create_vlm_dataset(tmp_path / "pairs", tmp_path / "out")

    def test_bad_ratios(self, tmp_path):
        with pytest.raises(ValueError, match="summing to 1"):
            create_vlm_dataset([], tmp_path / "out", split_ratios=(0.8, 0.1, 0.2))


def test_create_vlm_dataset_script(tmp_path):
    from PIL import Image

    from conftest import run_script

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    fens = [
        "rnbqkbnr/pppppppp/8/8/8/8/PPPPPPPP/RNBQKBNR w KQkq - 0 1",
        "rnbqkbnr/pppppppp/8/8/4P3/8/PPPP1PPP/RNBQKBNR b KQkq e3 0 1",
        "8/8/8/4k3/8/8/4K3/8 w - - 0 1",
        "8/8/8/3k4/8/8/3K4/8 b - - 5 40",
    ]
    for number, fen in enumerate(fens):
        Image.new("RGB", (32, 32), "white").save(pairs / f"board{number}.png")
        (pairs / f"board{number}.fen").write_text(fen + "\n")
    output = tmp_path / "out"
    result = run_script(
        [
            "scripts/create_vlm_dataset.py",
            "--pairs",
            str(pairs),
            "--output",
            str(output),
            "--max_samples",
            "3",
            "--split_ratios",
            "0.34",
            "0.33",
            "0.33",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sizes = {split: len(json.loads((output / f"{split}.json").read_text())) for split in ("train", "val", "test")}
    # max_samples keeps 3 of the 4 pairs; held-out counts round down (0.33 * 3 -> 0), train takes the rest.
    assert sizes == {"train": 3, "val": 0, "test": 0}
    (pairs / "board0.fen").unlink()
    result = run_script(["scripts/create_vlm_dataset.py", "--pairs", str(pairs), "--output", str(tmp_path / "o2")])
    assert result.returncode == 2 and "board0" in result.stderr
