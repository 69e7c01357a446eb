import json

from service import cli


def test_generate_prints_json_token_ids(small_ckpt, capsys):
    rc = cli.main(["generate", "--checkpoint", str(small_ckpt), "--prompt-ids", "2,105,10,11", "--seed", "7",
                   "--max-new-tokens", "20", "--max-denoising-steps", "3", "--device", "cpu", "--dtype", "float32",
                   "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    # whole canvases of 16, pad included as the reference returns them; EOS may end it after the first
    assert len(out["token_ids"]) in (16, 32)
    assert out["stats"]["decoder_passes"] >= 2


def test_generate_bad_input_is_a_clear_error(small_ckpt, capsys):
    rc = cli.main(["generate", "--checkpoint", str(small_ckpt), "--prompt-ids", "2,3", "--max-denoising-steps", "0"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "max_denoising_steps" in err and "Traceback" not in err
    rc = cli.main(["generate", "--checkpoint", str(small_ckpt), "--prompt", "hello"])
    assert rc == 2 and "tokenizer" in capsys.readouterr().err
