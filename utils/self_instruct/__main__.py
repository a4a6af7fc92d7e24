"""`python -m utils.self_instruct ...`: the command line (flags: utils/self_instruct/args.py)."""
from utils.self_instruct.loop import main

if __name__ == "__main__":
    main()
