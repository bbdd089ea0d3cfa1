"""``python -m services.sender``: the Faust sender worker."""

from services.sender.service import main

if __name__ == "__main__":
    main()
