"""The trainer's side: launch, watch and fetch a run from Jupyter (``from atlas_swarm import Run``).

    run.py         Run: create / launch / attach / status / watch / contribute / adapter / evaluate / fund / rewards
    contribute.py  this machine as a background peer process (`python -m atlas_swarm.peer`)
    fetch.py       the published adapter: choose its CID, fetch and verify every block, load or evaluate it
    display.py     watch(): tqdm.notebook + matplotlib in Jupyter, text lines elsewhere
"""

from atlas_swarm.notebook.run import Run

__all__ = ["Run"]
