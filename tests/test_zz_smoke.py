import tasks

def test_by_value(cluster_client, embedded_client):
    assert cluster_client.submit(tasks.square, 3).result(10) == 9
    assert embedded_client.submit(tasks.square, 4).result(10) == 16
    assert cluster_client.submit(lambda x: x + 1, 3).result(10) == 4
    def closure(y, k=5):
        return y * k
    assert embedded_client.submit(closure, 3).result(10) == 15
    f = embedded_client.submit(tasks.raise_unpicklable_error)
    e = f.exception(10)
    print(type(e), e, getattr(e, "remote_type", None))
