"""The Streamlit apps. The only part of Mem_Chat that imports streamlit (and only in its submodules)."""

import sys


def running_under_streamlit() -> bool:
    """True when the calling script is being run by Streamlit (``streamlit run``, AppTest).

    Cheap on the command line: streamlit is only imported if something already loaded it.
    """
    if "streamlit" not in sys.modules:
        return False
    from streamlit.runtime import exists

    return exists()
