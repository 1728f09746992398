"""What the test_rejections_* files share: the checks that a rejection is one line (and, for the CLI, exit 2 with
nothing written), and the files and run directories they build."""

from soralib.cli import main


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def fails_cleanly(capsys, argv, expected, out=None, code=2) -> str:
    """`sora ...` exits `code` with one stderr line holding `expected`, and `out` was not created."""
    assert main([str(a) for a in argv]) == code
    err = capsys.readouterr().err
    # Loading a model may draw a progress bar on stderr first; the error is one line of its own after it.
    errors = [line for line in err.splitlines() if line.startswith(f"sora {argv[0]}: error: ")]
    assert len(errors) == 1 and expected in errors[0], err
    assert err.rstrip().endswith(errors[0]), err
    if out is not None:
        assert not out.exists(), f"a failed start left {sorted(p.name for p in out.iterdir())} behind"
    return err


def _write(path, text):
    path.write_text(text)
    return path


def _fake_run(run, glue_dir, tiny_model, method="sora", **files):
    """A run directory as `sora train` leaves it, with only config.yaml and the given files (path -> text)."""
    from soralib.train.config import build_config, save_yaml

    config = build_config(method, None, {"task": "rte", "model": str(tiny_model), "data_dir": str(glue_dir),
                                         "output_dir": str(run)})
    run.mkdir()
    save_yaml(config, run / "config.yaml")
    for name, text in files.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)
    return run
