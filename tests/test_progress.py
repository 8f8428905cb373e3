"""Progress lines of running stages: their content, in place on a terminal, plain lines otherwise."""

import io

from pipelines.run.progress import ProgressBoard, StageProgress, format_progress, progress_file


def test_a_train_line_has_step_loss_throughput_elapsed_and_eta():
    state = {"done": 12, "total": 40, "unit": "step", "first": 2, "elapsed_s": 50.0, "loss": 1.23456,
             "tokens_per_s": 311.6}
    # 10 steps in 50 s → 28 steps left take 140 s
    assert format_progress("task1/train", state).split() == \
        ["task1/train", "step", "12/40", "loss", "1.2346", "312", "tok/s", "elapsed", "0:50", "ETA", "2:20"]
    done = {"done": 72, "total": 72, "unit": "examples", "first": 0, "elapsed_s": 3725.0}
    assert format_progress("task0/evaluate", done).split() == ["task0/evaluate", "examples", "72/72", "elapsed",
                                                               "1:02:05"]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_board_updates_in_place_on_a_terminal_and_prints_plain_lines_otherwise(tmp_path):
    for out, interval in ((_Terminal(), 0.0), (io.StringIO(), 0.0)):
        board = ProgressBoard(tmp_path, out, interval=interval, poll=3600)  # refreshed by hand below
        board.watch("task0/evaluate")
        writer = StageProgress(str(progress_file(tmp_path, "task0/evaluate")), 48, "examples", every_s=0)
        for done in (24, 48):
            writer.update(done)
            board.refresh()
        board.message("  task0/evaluate        done in 3.0s")
        board.unwatch("task0/evaluate")
        board.close()
        text = out.getvalue()
        assert not progress_file(tmp_path, "task0/evaluate").exists()
        if isinstance(out, _Terminal):
            # each update rewrites the one line; the driver's message clears it and takes its own line
            parts = text.split("\r\x1b[K")
            assert parts[0] == "" and parts[-1] == "  task0/evaluate        done in 3.0s\n"
            assert [p.split()[:3] for p in parts[1:-1]] == [["task0/evaluate", "examples", "24/48"],
                                                           ["task0/evaluate", "examples", "48/48"]]
        else:
            assert [line.split()[:3] for line in text.splitlines()] == [
                ["task0/evaluate", "examples", "24/48"], ["task0/evaluate", "examples", "48/48"],
                ["task0/evaluate", "done", "in"]]
