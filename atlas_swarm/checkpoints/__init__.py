"""A run's checkpoints, content-addressed: publishing the swarm's adapter, choosing the one a run vouches for, and
keeping copies so the result outlives the peers. Above storage/ (blocks, CIDs) and swarm/ (records, block serving).

    publish.AdapterPublisher  every K epochs the group's elected peer stores the adapter, lists its CID in its signed
                              record of the run and serves the blocks
    vouch                     which published adapter a run vouches for (pure: a majority of its peers, not one record)
    keeper.Keeper             copies the vouched adapters of the runs it watches, within quotas, and serves them
"""
