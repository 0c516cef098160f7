"""The public surface: what `import dispatcher` promises."""

from __future__ import annotations

import pickle

import dispatcher
from dispatcher import errors


def test_every_public_name_is_exported_once_and_resolves() -> None:
    assert len(dispatcher.__all__) == len(set(dispatcher.__all__))
    for name in dispatcher.__all__:
        assert getattr(dispatcher, name) is not None, name


def test_every_error_derives_from_the_base_and_pickles() -> None:
    public = [
        value
        for value in vars(errors).values()
        if isinstance(value, type)
        and issubclass(value, Exception)
        and value.__module__ == errors.__name__
    ]
    assert dispatcher.DispatcherError in public
    for error_type in public:
        assert issubclass(error_type, dispatcher.DispatcherError)
        assert error_type.__doc__, error_type
    assert issubclass(dispatcher.WorkerDied, dispatcher.DispatcherError)
    died = pickle.loads(pickle.dumps(dispatcher.WorkerDied("worker 12 died")))
    assert str(died) == "worker 12 died"
