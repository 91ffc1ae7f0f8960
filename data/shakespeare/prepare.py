"""
Tiny Shakespeare with the GPT-2 BPE (nanoGPT's shakespeare dataset).

    python data/shakespeare/prepare.py [--input PATH]
"""
import argparse
import sys
import urllib.request
from pathlib import Path

if not __package__:  # run as a script: make `data` importable from the project root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data.text import prepare_text

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def prepare(out_dir=Path(__file__).parent, input_path=None):
    """Tokenize input_path (default: input.txt here, downloaded once if missing) into out_dir."""
    if input_path is None:
        input_path = Path(__file__).parent / "input.txt"
        if not input_path.exists():
            try:
                with urllib.request.urlopen(URL, timeout=10) as r:
                    data = r.read()
            except OSError as e:
                raise FileNotFoundError(f"cannot download tinyshakespeare ({e}); place the file at "
                                        f"{input_path} or pass its path with --input") from None
            tmp = input_path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(input_path)
    return prepare_text(input_path, out_dir)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="a local copy of tinyshakespeare (or any UTF-8 text)")
    args = parser.parse_args()
    try:
        meta = prepare(input_path=args.input)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {Path(__file__).parent} from {meta['source']} ({meta['encoding']})")
    for split, n in meta["n_tokens"].items():
        print(f"{split}: {n:,} tokens")
