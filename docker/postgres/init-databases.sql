-- Run once by the postgres image on an empty data volume (/docker-entrypoint-initdb.d), as
-- POSTGRES_USER, after it created POSTGRES_DB (shipyard: the platform's jobs, audit, predictions...).
-- MLflow's tracking and registry store, MLflow's users (its basic-auth app) and Prefect's server each
-- get a database of their own, owned by the same user.
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
CREATE DATABASE prefect;
