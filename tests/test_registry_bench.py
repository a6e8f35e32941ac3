"""The registry benchmark's bulk loader writes what registration would, and the benchmark runs.

``benchmarks/registry_bench.py --loader copy`` renders each submission's rows from the rows the
real registration path produced for one template submission; if a substitution went astray
(a short value replaced inside a scheme UUID, a constant taken for a generated id), FindDocuments
over the copied corpus would measure the wrong thing or find nothing. The rendered rows are
compared with a real registration's, column by column, codes, slot values and XML; and the
benchmark runs end to end on a private PostgreSQL at a small size (no timing is asserted).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.postgres import PostgresServer, _bindir
from xca_gateway.protocol.xmlsafe import parse_xml
from xca_gateway.registry.packing import unpack
from xca_gateway.registry.postgres_store import PostgresRegistryStore
from xca_gateway.registry.submit import RegistryContext, parse_submission, plan_registration

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location(
        "benchmark_registry_bench", BENCHMARKS / "registry_bench.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, spec.name, module)
        spec.loader.exec_module(module)
        yield module


@pytest.mark.parametrize(("patients", "index"), [(1000, 5), (7, 123456), (100000, 999999)])
def test_copied_rows_are_what_registration_writes(
    bench: ModuleType, patients: int, index: int
) -> None:
    rows = bench.SubmissionRows(patients, 10)
    objects, codes, values = rows.render(index, 100, 1)
    request = parse_xml(bench.submission_bytes(index, patients, 10), bench._LIMITS)
    plan = plan_registration(parse_submission(request, now="20250101120000"), RegistryContext())
    assert len(objects) == len(plan.inserts) == 21
    # Registration draws random entryUUIDs and ids; the copy numbers them. Same ids in order.
    real_ids: dict[str, None] = {}
    for obj in plan.inserts:
        real_ids.update(dict.fromkeys(bench._ID.findall(obj.xml().decode())))
    copied_ids: dict[str, None] = {}
    for row in objects:
        copied_ids.update(dict.fromkeys(bench._ID.findall(unpack(row[-1]).decode())))
    assert len(real_ids) == len(copied_ids) == len(set(copied_ids))
    renamed = dict(zip(real_ids, copied_ids, strict=True))

    def same_ids(text: str | None) -> str | None:
        if text is None:
            return None
        for real, copied in renamed.items():
            text = text.replace(real, copied)
        return text

    for seq, (row, obj) in enumerate(zip(objects, plan.inserts, strict=True), start=100):
        columns = [
            obj.uuid,
            obj.kind.value,
            obj.object_type,
            obj.status,
            obj.patient_id,
            obj.unique_id,
            obj.lid,
            obj.creation_time,
            obj.service_start,
            obj.service_stop,
            obj.availability,
            obj.submission_time,
            obj.source_id,
            obj.last_update,
            obj.source_uuid,
            obj.target_uuid,
            obj.hash,
        ]
        assert row[0] == seq
        assert list(row[1:-1]) == [same_ids(c) for c in columns]
        assert unpack(row[-1]).decode() == same_ids(obj.xml().decode())
    assert [c[1:] for c in codes] == [
        (a.value, code.code, code.scheme or "") for obj in plan.inserts for a, code in obj.codes
    ]
    assert [v[1:] for v in values] == [
        (a.value, value) for obj in plan.inserts for a, value in obj.values
    ]


def test_generated_rows_are_what_registration_writes(
    bench: ModuleType, postgres_server: PostgresServer
) -> None:
    """The code and value rows the bulk load generates inside PostgreSQL (template rows
    crossed with submission numbers) equal registration's, for submissions spread over the
    corpus (first, small and large numbers, every modality and author residue)."""
    import psycopg

    database = postgres_server.create_database()
    url = postgres_server.url(database)
    try:
        PostgresRegistryStore(url, workers=1).close_sync()
        patients, first = 1000, 100
        rows = bench.SubmissionRows(patients, 10)
        per_objects = len(rows.objects)
        indexes = [2, 3, 5, 123456, 999999]
        with psycopg.connect(url, autocommit=True) as conn:
            bench._create_templates(conn, rows)
            for table in ("object_code", "object_value"):
                sql = bench.generated_rows_sql(table, first, per_objects, 10)
                for index in indexes:
                    conn.execute(sql, {"lo": index, "hi": index})
            codes = conn.execute(
                "SELECT seq, attr, code, scheme FROM object_code ORDER BY seq, ctid"
            ).fetchall()
            values = conn.execute(
                "SELECT seq, attr, value FROM object_value ORDER BY seq, ctid"
            ).fetchall()
        expected_codes: list[tuple[object, ...]] = []
        expected_values: list[tuple[object, ...]] = []
        for index in indexes:
            seq = first + index * per_objects
            _objects, rendered_codes, rendered_values = rows.render(index, seq, 1)
            assert len(rendered_codes) == 71 and len(rendered_values) == 20
            expected_codes += rendered_codes
            expected_values += rendered_values
            # And straight against the registration of that submission.
            request = parse_xml(bench.submission_bytes(index, patients, 10), bench._LIMITS)
            plan = plan_registration(
                parse_submission(request, now="20250101120000"), RegistryContext()
            )
            generated = [c[1:] for c in codes if seq <= c[0] < seq + per_objects]
            assert generated == [
                (a.value, code.code, code.scheme or "")
                for obj in plan.inserts
                for a, code in obj.codes
            ]
            assert [v[1:] for v in values if seq <= v[0] < seq + per_objects] == [
                (a.value, value) for obj in plan.inserts for a, value in obj.values
            ]
        assert [tuple(c) for c in codes] == expected_codes
        assert [tuple(v) for v in values] == expected_values
    finally:
        postgres_server.drop_database(database)


def test_a_template_sql_cannot_compute_is_refused(bench: ModuleType) -> None:
    rows = bench.SubmissionRows(1000, 10)
    k, d, attr, _value = rows.values[0]
    rows.values[0] = (k, d, attr, "{unique}")
    with pytest.raises(ValueError, match="not computed in SQL"):
        bench._template_rows(rows, "object_value")


@pytest.mark.skipif(_bindir() is None, reason="PostgreSQL server binaries are not installed")
def test_the_benchmark_runs_on_postgresql() -> None:
    # The server's directory is under the system temp directory, where the postgres account
    # (when running as root) can reach it; the benchmark removes it.
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "registry_bench.py"),
            "--backend",
            "postgresql",
            "--entries",
            "2000",
            "--queries",
            "5",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["entries"] == 2000
    # The probe patient's 20 entries, and 10 of a patient whose rows were copied.
    assert report["find_documents"]["results"] == 20
    assert report["find_documents_random_patients"]["results"] == 10
    assert any("registry_object_patient" in line for line in report["find_documents_plan"])
