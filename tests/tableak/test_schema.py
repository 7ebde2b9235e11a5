import numpy as np
import pandas as pd
import pytest
import torch

from tableak.data import HEALTH_HELP, LAWSCHOOL_HELP, load_table, read_csv_table
from tableak.schema import TabularSchema


def _same(decoded: pd.DataFrame, original: pd.DataFrame, schema: TabularSchema) -> None:
    for f in schema.features:
        if f.kind == "categorical":
            assert list(decoded[f.name]) == [str(v).strip() for v in original[f.name]], f.name
        else:
            np.testing.assert_allclose(decoded[f.name].to_numpy(float), original[f.name].to_numpy(float), err_msg=f.name)


def test_adult_dims_and_round_trip(adult):
    df, schema = adult
    assert schema.dim == 105  # TabLeak's d for Adult
    assert len(df) == 30162 + 15060
    assert sum(f.kind == "continuous" for f in schema.features) == 6
    rows = df.sample(500, random_state=0).reset_index(drop=True)
    x = schema.encode(rows)
    assert x.shape == (500, 105)
    _same(schema.decode(x), rows, schema)
    # array-level projection is idempotent on encoded data
    np.testing.assert_allclose(schema.project(x).numpy(), x.numpy(), atol=1e-5)


def test_german_dims_and_round_trip(german):
    df, schema = german
    assert schema.dim == 63 and len(df) == 1000
    assert schema.classes == ("1", "2")
    x = schema.encode(df)
    _same(schema.decode(x), df, schema)
    # standardised columns: zero mean, unit std where the column varies
    assert np.allclose(x.numpy().mean(0), 0, atol=1e-4)


def _mixed_csv(tmp_path):
    p = tmp_path / "mixed.csv"
    p.write_text(
        "age,city,score,const,zip,label\n"
        "31,Paris,1.5,7,75001,yes\n"
        "45,Rome,,7,00100,no\n"
        "27,Paris,2.25,7,75002,yes\n"
        ",Oslo,3.0,7,0150,no\n"
        "52,Rome,0.5,7,00100,yes\n"
        "38,Oslo,1.0,7,0150,no\n")
    return p


def test_schema_inference_mixed_csv(tmp_path):
    p = _mixed_csv(tmp_path)
    df, schema = read_csv_table(p, label="label", categorical=["zip"])
    kinds = {f.name: f.kind for f in schema.features}
    assert kinds == {"age": "continuous", "city": "categorical", "score": "continuous", "zip": "categorical"}
    assert schema.dropped == ("const",)
    assert len(df) == 4  # the rows with a missing age / score are dropped
    by = {f.name: f for f in schema.features}
    assert by["age"].integer and not by["score"].integer
    assert by["city"].categories == ("Oslo", "Paris", "Rome")
    assert schema.dim == 2 + 3 + len(by["zip"].categories)
    _same(schema.decode(schema.encode(df)), df, schema)


def test_csv_label_errors(tmp_path):
    p = _mixed_csv(tmp_path)
    with pytest.raises(ValueError, match="label column 'nope'"):
        read_csv_table(p, label="nope")
    with pytest.raises(ValueError, match="must be binary"):
        read_csv_table(p, label="city")
    with pytest.raises(ValueError, match="--label"):
        read_csv_table(p, label=None)
    with pytest.raises(FileNotFoundError, match="no such CSV"):
        read_csv_table(tmp_path / "absent.csv", label="label")
    with pytest.raises(ValueError, match="not in the table"):
        read_csv_table(p, label="label", categorical=["ghost"])


def test_external_datasets_explain_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="lawschs1_1.dta") as e:
        load_table(f"lawschool:{tmp_path}")
    assert LAWSCHOOL_HELP in str(e.value)
    with pytest.raises(FileNotFoundError, match="Claims.csv") as e:
        load_table(f"health:{tmp_path}")
    assert HEALTH_HELP in str(e.value)


def test_health_heritage_loader_on_synthetic_files(tmp_path):
    """The loader's merge logic on a tiny synthetic copy of the Kaggle file layout."""
    (tmp_path / "Claims.csv").write_text(
        "MemberID,ProviderID,Vendor,PCP,Year,Specialty,PlaceSvc,PayDelay,LengthOfStay,DSFS,PrimaryConditionGroup,CharlsonIndex,ProcedureGroup,SupLOS\n"
        "1,10,100,5,Y1,Surgery,Office,30,,0- 1 month,ARTHSPIN,0,MED,0\n"
        "1,11,100,5,Y1,Surgery,Office,162+,,0- 1 month,ARTHSPIN,1-2,EM,0\n"
        "2,12,101,6,Y1,Internal,Urgent Care,10,,0- 1 month,NEUMENT,0,EM,0\n"
        "3,12,101,6,Y2,Internal,Office,20,,0- 1 month,NEUMENT,3-4,EM,0\n")
    (tmp_path / "DrugCount.csv").write_text("MemberID,Year,DSFS,DrugCount\n1,Y1,1- 2 months,3\n2,Y1,0- 1 month,7+\n")
    (tmp_path / "LabCount.csv").write_text("MemberID,Year,DSFS,LabCount\n1,Y1,1- 2 months,2\n3,Y2,0- 1 month,10+\n")
    (tmp_path / "Members.csv").write_text("MemberID,AgeAtFirstClaim,Sex\n1,30-39,M\n2,40-49,F\n3,,\n")
    df, schema = load_table(f"health:{tmp_path}")
    assert len(df) == 3 and schema.label == "max_CharlsonIndex"
    assert sorted(df["max_CharlsonIndex"]) == ["0", "1", "1"]
    assert df.loc[0, "PayDelay_max"] == 162 and df.loc[0, "no_Claims"] == 2


def test_kit_reads_csv_with_case_options(tmp_path):
    from common.case import Case
    from tableak.kit import TabularKit

    p = _mixed_csv(tmp_path)
    case = Case("t", "tabular", "fc", str(p), options={"label": "label", "categorical": "zip"})
    pool = TabularKit().load_pool(case, data_path=None)
    assert {f.name: f.kind for f in pool.schema.features}["zip"] == "categorical"
    assert pool.x.shape == (4, pool.schema.dim) and pool.y.tolist() == [1, 1, 1, 0]
    with pytest.raises(ValueError, match="--label"):
        TabularKit().load_pool(Case("t", "tabular", "fc", str(p)), data_path=None)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_reconstruction_cells_are_wrong(tmp_path, bad):
    """A NaN/Inf reconstructed cell is always wrong: it used to pass `abs(nan - x) > tol` (False ->
    "correct"), decode Inf to the column's bound, and argmax a NaN block to the first category."""
    from tableak.kit import tabular_scores

    df, schema = read_csv_table(_mixed_csv(tmp_path), label="label", categorical=["zip"])
    truth = df.drop(columns="label").reset_index(drop=True)
    x = schema.encode(truth).numpy().astype(float)
    assert tabular_scores(schema.decode(torch.tensor(x)), truth, schema)["accuracy"] == 1.0
    x[0, :] = bad  # row 0 broken entirely
    (_, city), (_, zip_) = schema.categorical
    x[1, city] = bad  # row 1: one categorical block
    x[2, schema.continuous_index[0]] = bad  # row 2: one continuous cell
    pc, pn = schema.decode_arrays(x)
    assert (pc[0] == -1).all() and np.isnan(pn[0]).all()
    assert pc[1, 0] == -1 and pc[1, 1] >= 0 and np.isnan(pn[2, 0]) and np.isfinite(pn[2, 1])
    tc, tn = schema.frame_to_arrays(truth)
    n_feat = pc.shape[1] + pn.shape[1]
    err = schema.feature_errors(pc, pn, tc, tn)
    assert err[0].min() == 1.0  # the broken row matches no true row on any feature
    m = tabular_scores(schema.decode(torch.tensor(x)), truth, schema)
    assert m["accuracy"] == pytest.approx(1 - (n_feat + 2) / (len(truth) * n_feat))
    assert m["exact_row"] == pytest.approx(1 / len(truth)) and m["nrmse"] == float("inf")
    # the projection keeps a broken cell broken instead of repairing it into a valid value
    proj = schema.project(torch.tensor(x, dtype=torch.float32)).numpy()
    assert np.isnan(proj[0]).all() and np.isfinite(proj[3]).all()
    assert schema.decode(torch.tensor(x))["city"].isna().tolist()[:3] == [True, True, False]  # missing, not a category
