"""The ui_actions task: action formats and their round trips, coordinate mappings across resizes, metrics on
hand-computed cases, the prompt, loading with bad rows, and deterministic demo data."""

import dataclasses
import inspect
import json
import math

import pytest

from vlm_recipes.data.errors import BadRow
from vlm_recipes.data.rows import BadRowReport
from vlm_recipes.tasks import get_task
from vlm_recipes.tasks.ui_actions.format import (
    ACTION_FORMATS,
    ACTION_SYNTAX,
    ACTION_TYPES,
    ActionDecoder,
    encode_action,
    validate_action,
)
from vlm_recipes.tasks.ui_actions.geometry import (
    COORDINATE_SYSTEMS,
    from_normalized,
    from_resized,
    smart_resize,
    to_coordinate_system,
    to_normalized,
    to_original_pixels,
    to_resized,
)
from vlm_recipes.tasks.ui_actions.metrics import aggregate_action_scores, score_action
from vlm_recipes.tasks.ui_actions.task import UIActionsOptions, UIActionsTask

CLICK = {"type": "click", "x": 100, "y": 200}
TYPE = {"type": "type", "text": "hello"}
SCROLL = {"type": "scroll", "direction": "down", "amount": 100}
WAIT = {"type": "wait", "seconds": 2}

# Each action in each format, written out by hand (the module docstring's table).
ENCODINGS = [
    (CLICK, "text", "click(100, 200)"),
    (TYPE, "text", 'type("hello")'),
    (SCROLL, "text", "scroll(down, 100)"),
    (WAIT, "text", "wait(2)"),
    (CLICK, "json", '{"type": "click", "x": 100, "y": 200}'),
    (TYPE, "json", '{"type": "type", "text": "hello"}'),
    (SCROLL, "json", '{"type": "scroll", "direction": "down", "amount": 100}'),
    (WAIT, "json", '{"type": "wait", "seconds": 2}'),
    (CLICK, "coordinates", "100 200 click"),
    (TYPE, "coordinates", 'type "hello"'),
    (SCROLL, "coordinates", "scroll down 100"),
    (WAIT, "coordinates", "wait 2"),
]

# Harder values: fractional points and seconds, text with quotes, backslashes, newlines and non-ASCII letters.
TRICKY_ACTIONS = [
    {"type": "click", "x": 12.5, "y": 0},
    {"type": "type", "text": 'say "hi"\\ then\nnew line, café'},
    {"type": "type", "text": ""},
    {"type": "scroll", "direction": "left", "amount": 0},
    {"type": "wait", "seconds": 0.25},
]


class TestActionCodec:
    @pytest.mark.parametrize(("action", "action_format", "text"), ENCODINGS)
    def test_encode_matches_the_documented_form(self, action, action_format, text):
        assert encode_action(action, action_format) == text

    @pytest.mark.parametrize(("action", "action_format", "text"), ENCODINGS)
    def test_decode_gives_the_same_dict_in_every_format(self, action, action_format, text):
        assert ActionDecoder().decode(text) == action

    @pytest.mark.parametrize("action_format", ACTION_FORMATS)
    @pytest.mark.parametrize("action", [CLICK, TYPE, SCROLL, WAIT, *TRICKY_ACTIONS])
    def test_round_trip(self, action, action_format):
        text = encode_action(action, action_format)
        assert ActionDecoder().decode(text) == action
        assert ActionDecoder([action_format]).decode(f"  {text}\n") == action  # surrounding whitespace is forgiven

    def test_integral_floats_are_written_as_integers(self):
        assert encode_action({"type": "click", "x": 100.0, "y": 7.0}, "text") == "click(100, 7)"
        assert validate_action({"type": "wait", "seconds": 3.0}) == {"type": "wait", "seconds": 3}

    def test_null_keys_of_other_action_types_are_ignored(self):
        # A table holding every action type (an Arrow struct) gives a type action null x, y, direction...
        unified = {"type": "type", "text": "hi", "x": None, "y": None, "direction": None, "amount": None}
        assert validate_action(unified) == {"type": "type", "text": "hi"}

    @pytest.mark.parametrize(
        "text",
        [
            "",
            "click(100)",
            "drag(1, 2)",
            "click the login button",
            "click(100, 200) then type",
            "scroll(sideways, 3)",
            '{"type": "click", "x": 100}',
            '{"type": "drag"}',
            "{not json",
            "100 click",
        ],
    )
    def test_unparseable_text_raises_with_the_text_and_the_accepted_forms(self, text):
        with pytest.raises(ValueError) as raised:
            ActionDecoder().decode(text)
        message = str(raised.value)
        assert repr(text) in message
        assert "click(x, y)" in message and '{"type": "click", "x": x, "y": y}' in message and "x y click" in message
        assert ActionDecoder().try_decode(text) is None

    def test_invalid_json_action_says_why(self):
        with pytest.raises(ValueError, match=r"json: unknown action type 'drag'"):
            ActionDecoder().decode('{"type": "drag", "x": 1}')

    def test_a_decoder_accepts_only_its_formats(self):
        decoder = ActionDecoder(["coordinates"])
        assert decoder.decode("100 200 click") == CLICK
        with pytest.raises(ValueError, match=r"Accepted forms: coordinates: x y click"):
            decoder.decode("click(100, 200)")
        with pytest.raises(ValueError, match="non-empty subset"):
            ActionDecoder(["xml"])

    @pytest.mark.parametrize(
        ("action", "problem"),
        [
            ({"type": "click", "x": 1}, "click needs numeric `x` and `y`"),
            ({"type": "click", "x": True, "y": 2}, "click needs numeric"),
            ({"type": "hover"}, "unknown action type 'hover'"),
            ({"type": "scroll", "direction": "sideways", "amount": 1}, "scroll needs a `direction`"),
            ({"type": "scroll", "direction": "up", "amount": -5}, "non-negative numeric `amount`"),
            ({"type": "type", "text": 5}, "string `text`"),
            ({"type": "wait"}, "wait needs"),
            ("click", "must be an object"),
        ],
    )
    def test_invalid_actions_cannot_be_encoded(self, action, problem):
        with pytest.raises(ValueError, match=problem):
            encode_action(action, "text")


class TestCoordinates:
    def test_normalized_grid_by_hand(self):
        # 100 / 200 * 1000 = 500, 30 / 120 * 1000 = 250; 1 / 3 * 1000 = 333.3 -> 333
        assert to_normalized((100, 30), (200, 120)) == (500, 250)
        assert to_normalized((1, 0), (3, 10)) == (333, 0)
        assert from_normalized((500, 250), (200, 120)) == (100, 30)

    def test_resize_by_hand(self):
        # 160x120 shown as 168x112: x * 168 / 160, y * 112 / 120
        assert to_resized((80, 60), (160, 120), (168, 112)) == (84, 56)
        assert from_resized((84, 56), (160, 120), (168, 112)) == (80, 60)

    @pytest.mark.parametrize(
        ("size", "budget", "expected"),
        [
            ((160, 120), {}, (168, 112)),  # each side to the nearest multiple of 28; area 18816 in budget
            ((256, 192), {}, (252, 196)),
            # 1932x1092 is over 401408 pixels: scale = sqrt(1920*1080/401408) = 2.273; floor(30.2)*28, floor(16.97)*28
            ((1920, 1080), {"max_pixels": 401408}, (840, 448)),
            # 28x28 is under 56*56: scale = sqrt(3136/400) = 2.8; ceil(56/28)*28 each side
            ((20, 20), {}, (56, 56)),
        ],
    )
    def test_smart_resize_by_hand(self, size, budget, expected):
        assert smart_resize(*size, **budget) == expected

    @pytest.mark.parametrize("size", [(160, 120), (255, 97), (1920, 1080), (33, 700), (4000, 3000)])
    @pytest.mark.parametrize(("min_pixels", "max_pixels"), [(3136, 1003520), (3136, 401408), (200704, 401408)])
    def test_smart_resize_keeps_multiples_of_28_within_budget(self, size, min_pixels, max_pixels):
        width, height = smart_resize(*size, min_pixels=min_pixels, max_pixels=max_pixels)
        assert width % 28 == 0 and height % 28 == 0
        assert min_pixels <= width * height <= max_pixels

    # Resizes with a scale of at most 2 per side (so rounding to whole resized pixels moves a point by at most
    # 0.5 * scale <= 1 original pixel): upscales, near-identity and downscales by a budget.
    RESIZES = [
        ((160, 120), {}),
        ((256, 192), {}),
        ((224, 168), {"min_pixels": 200704}),  # upscaled about 2.1x by area
        ((1280, 720), {"max_pixels": 401408}),
        ((1000, 700), {"max_pixels": 200704}),
        ((37, 301), {}),
    ]

    @pytest.mark.parametrize(("original", "budget"), RESIZES)
    def test_original_resized_original_round_trip(self, original, budget):
        resized = smart_resize(*original, **budget)
        scale_x, scale_y = original[0] / resized[0], original[1] / resized[1]
        assert max(scale_x, scale_y) <= 2
        width, height = original
        for point in [(0, 0), (width, height), (width / 3, height / 7), (width - 1, 1), (width / 2, height / 2)]:
            exact = from_resized(to_resized(point, original, resized), original, resized)
            assert math.dist(exact, point) < 1e-9
            # What a model that answers in whole pixels of the resized image gives back
            rounded = tuple(round(value) for value in to_resized(point, original, resized))
            back = from_resized(rounded, original, resized)
            assert abs(back[0] - point[0]) <= 0.5 * scale_x + 1e-9 and abs(back[1] - point[1]) <= 0.5 * scale_y + 1e-9
            assert abs(back[0] - point[0]) <= 1 and abs(back[1] - point[1]) <= 1

    @pytest.mark.parametrize(("original", "budget"), [*RESIZES, ((1920, 1080), {"max_pixels": 401408})])
    def test_normalized_points_survive_any_resize_exactly(self, original, budget):
        resized = smart_resize(*original, **budget)
        for grid_point in [(0, 0), (1000, 1000), (333, 667), (500, 1), (999, 250)]:
            in_resized = from_normalized(grid_point, resized)
            assert to_normalized(in_resized, resized) == grid_point  # the grid does not depend on size
            in_original = from_resized(in_resized, original, resized)
            assert math.dist(in_original, from_normalized(grid_point, original)) < 1e-9

    def test_coordinate_system_moves_only_points(self):
        click = {"type": "click", "x": 50, "y": 25}
        assert to_coordinate_system(click, "normalized", (200, 100)) == {"type": "click", "x": 250, "y": 250}
        assert to_original_pixels({"type": "click", "x": 250, "y": 250}, "normalized", (200, 100)) == click
        assert to_coordinate_system(click, "absolute", (200, 100)) == click
        assert to_coordinate_system(SCROLL, "normalized", (200, 100)) == SCROLL
        with pytest.raises(ValueError, match="Unknown coordinate_system 'relative'"):
            to_coordinate_system(click, "relative", (200, 100))


BOX = [10, 20, 30, 40]  # centre (20, 30)


class TestScoreAction:
    def test_click_inside_the_box(self):
        scores = score_action({"type": "click", "x": 15, "y": 25}, {"type": "click", "x": 20, "y": 30}, BOX)
        assert scores["parsed"] == scores["type_correct"] == scores["click_in_box"] == scores["step_success"] == 1.0
        assert scores["click_distance"] == pytest.approx(math.sqrt(25 + 25))

    def test_click_outside_the_box(self):
        scores = score_action({"type": "click", "x": 31, "y": 25}, {"type": "click", "x": 20, "y": 30}, BOX)
        assert scores["type_correct"] == 1.0 and scores["click_in_box"] == 0.0 and scores["step_success"] == 0.0
        assert scores["click_distance"] == pytest.approx(math.sqrt(11**2 + 5**2))

    def test_box_edges_count_as_inside(self):
        assert score_action({"type": "click", "x": 30, "y": 40}, CLICK, BOX)["click_in_box"] == 1.0
        assert score_action({"type": "click", "x": 10, "y": 20}, CLICK, BOX)["click_in_box"] == 1.0

    def test_unparsed_prediction(self):
        scores = score_action(None, CLICK, BOX)
        assert scores["parsed"] == scores["type_correct"] == scores["click_in_box"] == scores["step_success"] == 0.0
        assert "click_distance" not in scores and scores["predicted_type_index"] == -1

    def test_wrong_type_for_a_click_has_no_distance(self):
        scores = score_action(TYPE, CLICK, BOX)
        assert scores["parsed"] == 1.0 and scores["type_correct"] == 0.0 and scores["click_in_box"] == 0.0
        assert "click_distance" not in scores
        assert (scores["target_type_index"], scores["predicted_type_index"]) == (0.0, 1.0)

    def test_click_without_a_box_is_scored_by_distance_only(self):
        scores = score_action({"type": "click", "x": 103, "y": 204}, CLICK, None)
        assert scores["click_distance"] == pytest.approx(5.0)
        assert "click_in_box" not in scores and "step_success" not in scores

    @pytest.mark.parametrize(
        ("predicted", "success"),
        [({"type": "type", "text": "hello"}, 1.0), ({"type": "type", "text": "Hello"}, 0.0), (WAIT, 0.0)],
    )
    def test_typed_text_exact_match(self, predicted, success):
        scores = score_action(predicted, TYPE, None)
        assert scores["text_exact_match"] == scores["step_success"] == success

    @pytest.mark.parametrize(
        ("predicted", "success"),
        [
            ({"type": "scroll", "direction": "down", "amount": 100}, 1.0),
            ({"type": "scroll", "direction": "up", "amount": 100}, 0.0),
            ({"type": "scroll", "direction": "down", "amount": 200}, 0.0),
        ],
    )
    def test_scroll_needs_direction_and_amount(self, predicted, success):
        scores = score_action(predicted, SCROLL, None)
        assert scores["type_correct"] == 1.0 and scores["step_success"] == success
        assert "click_in_box" not in scores and "text_exact_match" not in scores

    def test_wait_compares_numbers_not_spellings(self):
        assert score_action({"type": "wait", "seconds": 2.0}, WAIT, None)["step_success"] == 1.0
        assert score_action({"type": "wait", "seconds": 3}, WAIT, None)["step_success"] == 0.0


class TestAggregate:
    def test_hand_computed(self):
        target_click = {"type": "click", "x": 20, "y": 30}
        scores = [
            score_action({"type": "click", "x": 15, "y": 25}, target_click, BOX),  # hit, distance sqrt(50)
            score_action({"type": "click", "x": 31, "y": 25}, target_click, BOX),  # miss, distance sqrt(146)
            score_action(SCROLL, target_click, BOX),  # wrong type: a miss, no distance
            score_action(TYPE, TYPE, None),  # right
            score_action({"type": "type", "text": "help"}, TYPE, None),  # wrong text
            score_action(None, WAIT, None),  # unparsed
        ]
        metrics = aggregate_action_scores(scores)
        assert metrics["parse_rate"] == pytest.approx(5 / 6)
        assert metrics["action_type_accuracy"] == pytest.approx(4 / 6)  # two clicks and two types
        assert metrics["click_accuracy"] == pytest.approx(1 / 3)
        assert metrics["mean_click_distance"] == pytest.approx((math.sqrt(50) + math.sqrt(146)) / 2)
        assert metrics["typed_text_exact_match"] == pytest.approx(1 / 2)
        assert metrics["step_success"] == pytest.approx(2 / 6)
        assert metrics["step_success/click"] == pytest.approx(1 / 3) and metrics["count/click"] == 3
        assert metrics["step_success/wait"] == 0.0 and metrics["count/wait"] == 1
        assert math.isnan(metrics["step_success/scroll"]) and metrics["count/scroll"] == 0
        assert metrics["num_examples"] == 6

    def test_nothing_to_average_is_nan(self):
        metrics = aggregate_action_scores([score_action(WAIT, WAIT, None)])
        assert math.isnan(metrics["click_accuracy"]) and math.isnan(metrics["mean_click_distance"])
        assert metrics["step_success"] == 1.0


def _row(image_size=(200, 100), action=None, bbox=None):
    action = action or {"type": "click", "x": 20, "y": 30}
    return {"id": "r", "action": action, "target_bbox": bbox, "image_size": image_size}


class TestTaskScore:
    def test_normalized_prediction_is_scored_in_original_pixels(self):
        task = UIActionsTask(coordinate_system="normalized")
        row = _row(bbox=BOX)
        # (75, 300) on the grid of a 200x100 screenshot is (15, 30) in pixels: inside, 5 pixels from the centre
        scores = task.score("click(75, 300)", "click(100, 300)", row)
        assert scores["click_in_box"] == 1.0 and scores["click_distance"] == pytest.approx(5.0)
        absolute = UIActionsTask().score("click(75, 300)", "click(20, 30)", row)
        assert absolute["click_in_box"] == 0.0

    def test_unparseable_prediction_counts_against_parse_rate(self):
        task = UIActionsTask()
        rows = [_row(bbox=BOX), _row(action=WAIT)]
        scores = [task.score("I would click the button", "", rows[0]), task.score("wait(2)", "", rows[1])]
        metrics = task.aggregate(scores, rows)
        assert metrics["parse_rate"] == 0.5 and metrics["step_success"] == 0.5

    def test_rows_without_the_reference_columns_fail_loudly(self):
        # A dataset that keeps only id, images and messages would otherwise score every click as "no box".
        with pytest.raises(ValueError, match=r"lacks \['action', 'target_bbox', 'image_size'\]"):
            UIActionsTask().score("click(1, 2)", "click(1, 2)", {"id": "x", "messages": []})

    def test_rows_from_a_table_with_lists_and_null_keys(self):
        row = {
            "id": "t",
            "action": {"type": "click", "x": 20.0, "y": 30.0, "text": None},
            "target_bbox": [10.0, 20.0, 30.0, 40.0],
            "image_size": [200, 100],
        }
        assert UIActionsTask().score("click(20, 30)", "click(20, 30)", row)["step_success"] == 1.0


class TestPromptAndOptions:
    @pytest.mark.parametrize("action_format", ACTION_FORMATS)
    def test_documented_syntax_decodes(self, action_format):
        # The forms the system prompt shows, with values filled in, are forms the decoder takes.
        values = {"x": 12, "y": 34, "text": '"hi"', "direction": "up", "amount": 5, "seconds": 2}
        expected = {
            "click": {"type": "click", "x": 12, "y": 34},
            "type": {"type": "type", "text": "hi"},
            "scroll": {"type": "scroll", "direction": "up", "amount": 5},
            "wait": {"type": "wait", "seconds": 2},
        }
        for kind in ACTION_TYPES:
            text = ACTION_SYNTAX[action_format][kind].format(**values)
            assert ActionDecoder([action_format]).decode(text) == expected[kind]

    def test_system_prompt_lists_the_actions_in_the_chosen_format(self):
        text_prompt = UIActionsTask("text").system_prompt
        json_prompt = UIActionsTask("json").system_prompt
        coordinates_prompt = UIActionsTask("coordinates", "normalized").system_prompt
        for line in ["click(x, y)", 'type("text")', "scroll(direction, amount)", "wait(seconds)"]:
            assert f"- {line}:" in text_prompt
        assert '- {"type": "click", "x": x, "y": y}:' in json_prompt and "click(x, y)" not in json_prompt
        assert "- x y click:" in coordinates_prompt and "- scroll direction amount:" in coordinates_prompt
        assert "pixels of the screenshot" in text_prompt and "0-1000 grid" in coordinates_prompt

    def test_few_shot_examples_are_rendered_in_the_chosen_format(self, tmp_path):
        examples = [
            {"task": "Open the menu", "action": {"type": "click", "x": 5, "y": 6}},
            {"task": "Hold on", "action": WAIT},
        ]
        prompt = UIActionsTask("coordinates", few_shot_examples=examples).system_prompt
        assert prompt.endswith("Examples:\n\nTask: Open the menu\nAction: 5 6 click\n\nTask: Hold on\nAction: wait 2")
        path = tmp_path / "shots.json"
        path.write_text(json.dumps(examples))
        assert UIActionsTask("coordinates", few_shot_examples=str(path)).system_prompt == prompt
        assert "Examples" not in UIActionsTask().system_prompt

    @pytest.mark.parametrize(
        ("examples", "problem"),
        [
            ([{"task": "x", "action": {"type": "fly"}}], r"few_shot_examples\[0\]: unknown action type 'fly'"),
            ([{"action": WAIT}], r"few_shot_examples\[0\] must be a dict with a string `task`"),
            ({"task": "x"}, "must be a list"),
            ("/nonexistent/shots.json", "not found"),
        ],
    )
    def test_bad_few_shot_examples(self, examples, problem):
        with pytest.raises(ValueError, match=problem):
            UIActionsTask(few_shot_examples=examples)

    def test_registered_with_defaults(self):
        task = get_task("ui_actions")
        assert isinstance(task, UIActionsTask)
        assert (task.action_format, task.coordinate_system, task.few_shot_examples) == ("text", "absolute", [])

    def test_recipe_options_are_constructor_keywords(self):
        # `get_task` passes the options dataclass's fields as keywords, so the two must agree.
        fields = [option.name for option in dataclasses.fields(UIActionsOptions)]
        assert fields == list(inspect.signature(UIActionsTask).parameters)
        task = get_task("ui_actions", dataclasses.asdict(UIActionsOptions("json", "normalized")))
        assert (task.action_format, task.coordinate_system) == ("json", "normalized")

    @pytest.mark.parametrize(
        ("options", "problem"),
        [({"action_format": "xml"}, "`action_format` must be one of"), ({"coordinate_system": "rel"}, "`coordinate")],
    )
    def test_bad_options(self, options, problem):
        with pytest.raises(ValueError, match=problem):
            UIActionsTask(**options)
        with pytest.raises(ValueError, match=problem):
            UIActionsOptions(**options)


def _write_image(path, size=(200, 100)):
    from PIL import Image

    Image.new("RGB", size, (255, 255, 255)).save(path)


class TestLoadRows:
    GOOD = {
        "id": "a",
        "image": "shot.png",
        "task": "Click the login button",
        "action": CLICK,
        "target_bbox": [90, 190, 110, 210],
    }

    def write(self, tmp_path, rows):
        _write_image(tmp_path / "shot.png", size=(400, 300))
        lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
        (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")

    def test_row_shape(self, tmp_path):
        self.write(tmp_path, [self.GOOD, {"image": "shot.png", "task": "Type your name", "action": TYPE}])
        rows = UIActionsTask().load_rows(tmp_path, "train", tmp_path, BadRowReport())
        first, second = rows
        assert first["id"] == "a" and first["images"] == [str(tmp_path / "shot.png")]
        assert first["action"] == CLICK and first["target_bbox"] == [90, 190, 110, 210]
        assert first["image_size"] == (400, 300)
        system, user, assistant = first["messages"]
        assert system["role"] == "system" and "click(x, y)" in system["content"][0]["text"]
        assert user == {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Task: Click the login button"}],
        }
        assert assistant == {"role": "assistant", "content": [{"type": "text", "text": "click(100, 200)"}]}
        assert second["id"] == "train-2" and second["target_bbox"] is None
        assert UIActionsTask().target(second) == 'type("hello")'

    @pytest.mark.parametrize(
        ("action_format", "coordinate_system", "answer"),
        [
            ("text", "normalized", "click(250, 667)"),  # 100 / 400 * 1000, 200 / 300 * 1000 = 666.7
            ("json", "normalized", '{"type": "click", "x": 250, "y": 667}'),
            ("coordinates", "absolute", "100 200 click"),
        ],
    )
    def test_answer_in_the_chosen_format_and_coordinates(self, tmp_path, action_format, coordinate_system, answer):
        self.write(tmp_path, [self.GOOD])
        task = UIActionsTask(action_format, coordinate_system)
        (row,) = task.load_rows(tmp_path, "train", tmp_path, BadRowReport())
        assert task.target(row) == answer
        assert row["action"] == CLICK  # the reference stays in original pixels
        assert task.score(answer, answer, row)["step_success"] == 1.0

    def test_bad_row_error_names_file_and_row(self, tmp_path):
        self.write(tmp_path, [self.GOOD, {**self.GOOD, "action": {"type": "drag"}}])
        with pytest.raises(BadRow, match=r"train.jsonl, row 2 \(id a\): unknown action type 'drag'"):
            UIActionsTask().load_rows(tmp_path, "train", tmp_path, BadRowReport("error"))

    def test_skip_counts_every_bad_row(self, tmp_path):
        (tmp_path / "broken.png").write_bytes(b"not a png")
        self.write(
            tmp_path,
            [
                self.GOOD,
                "{not json",
                {**self.GOOD, "image": "missing.png"},
                {**self.GOOD, "action": {"type": "drag"}},
                {**self.GOOD, "action": {"type": "click"}},
                {**self.GOOD, "target_bbox": [1, 2, 3]},
                {**self.GOOD, "target_bbox": [30, 2, 10, 4]},
                {key: value for key, value in self.GOOD.items() if key != "task"},
                {**self.GOOD, "action": {"type": "click", "x": 401, "y": 5}},
                {**self.GOOD, "image": "broken.png"},
                {**self.GOOD, "target_bbox": None, "action": SCROLL},
            ],
        )
        report = BadRowReport("skip")
        rows = UIActionsTask().load_rows(tmp_path, "train", tmp_path, report)
        assert [row["action"]["type"] for row in rows] == ["click", "scroll"]
        reasons = {error.row: error.reason for error in report.skipped}
        assert sorted(reasons) == list(range(2, 11))
        assert "invalid JSON" in reasons[2]
        assert "missing.png not found" in reasons[3]
        assert "unknown action type 'drag'" in reasons[4]
        assert "click needs numeric `x` and `y`" in reasons[5]
        assert "must be 4 numbers" in reasons[6]
        assert "x0 > x1" in reasons[7]
        assert reasons[8] == "missing key `task`"
        assert "outside the 400x300 image" in reasons[9]
        assert "broken.png is not an image file that PIL can read" in reasons[10]

    def test_split_exists(self, tmp_path):
        self.write(tmp_path, [self.GOOD])
        assert UIActionsTask().split_exists(tmp_path, "train") and not UIActionsTask().split_exists(tmp_path, "val")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """Demo data written once for the module (40 examples: 32/4/4)."""
    directory = tmp_path_factory.mktemp("ui_actions_demo")
    UIActionsTask().make_data(directory, num=40, seed=3)
    return directory


class TestMakeData:
    @staticmethod
    def files(directory):
        paths = [path for path in directory.rglob("*") if path.is_file()]
        return {path.relative_to(directory).as_posix(): path.read_bytes() for path in paths}

    def test_same_seed_same_files(self, demo_dir, tmp_path):
        UIActionsTask().make_data(tmp_path / "again", num=40, seed=3)
        UIActionsTask().make_data(tmp_path / "other", num=40, seed=4)
        assert self.files(tmp_path / "again") == self.files(demo_dir)
        assert self.files(tmp_path / "other")["train.jsonl"] != self.files(demo_dir)["train.jsonl"]

    def test_splits_and_no_leftover_temporary_files(self, demo_dir):
        files = self.files(demo_dir)
        split_files = sorted(name for name in files if not name.startswith("images/"))
        assert split_files == ["test.jsonl", "train.jsonl", "val.jsonl"]  # no temporary file left behind
        counts = {split: len(files[f"{split}.jsonl"].decode().splitlines()) for split in ("train", "val", "test")}
        assert counts == {"train": 32, "val": 4, "test": 4}
        assert sum(name.endswith(".png") for name in files) == 40

    @pytest.mark.parametrize("coordinate_system", COORDINATE_SYSTEMS)
    def test_loads_cleanly_and_its_targets_score_perfectly(self, demo_dir, coordinate_system):
        task = UIActionsTask("text", coordinate_system)
        report = BadRowReport("error")
        rows = task.load_rows(demo_dir, "train", demo_dir, report)
        assert len(rows) == 32 and not report.skipped
        assert {row["action"]["type"] for row in rows} == set(ACTION_TYPES)
        for row in rows:
            width, height = row["image_size"]
            assert 160 <= width <= 256 and 120 <= height <= 192
            if row["action"]["type"] == "click":
                assert row["target_bbox"] is not None
        metrics = task.aggregate([task.score(task.target(row), task.target(row), row) for row in rows], rows)
        assert metrics["parse_rate"] == metrics["step_success"] == metrics["click_accuracy"] == 1.0

    def test_native_rows_carry_every_element_box(self, demo_dir):
        rows = [json.loads(line) for line in (demo_dir / "train.jsonl").read_text().splitlines()]
        clicks = [row for row in rows if row["action"]["type"] == "click"]
        assert clicks and all(row["target_bbox"] in [element["bbox"] for element in row["elements"]] for row in clicks)

    def test_too_few_examples(self, tmp_path):
        with pytest.raises(ValueError, match="num >= 3"):
            UIActionsTask().make_data(tmp_path, num=2, seed=0)
