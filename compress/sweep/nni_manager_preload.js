// given to NNI 3.0's manager by sweep.py --engine nni (compress/sweep/nni_engine.py): see the
// comment above MANAGER_PRELOAD there
const net = require('net');
const host = process.env.SWEEP_NNI_HOST;
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (host && typeof args[0] === 'number' && typeof args[1] !== 'string') {
    args.splice(1, 0, host);
  }
  return listen.apply(this, args);
};

const Module = require('module');
const load = Module._load;
Module._load = function (request, ...rest) {
  const exported = load.call(this, request, ...rest);
  const V3asV1 = exported && exported.V3asV1;
  if (request.endsWith('v3/compat') && V3asV1 && !V3asV1.ownParameters) {
    const submit = V3asV1.prototype.submitTrialJob;
    V3asV1.prototype.submitTrialJob = async function (form) {
      const trial = await submit.call(this, form);
      const queued = this.parameters.indexOf(form.hyperParameters.value);
      if (queued >= 0) {  // a new trial (a resumed one already has its own)
        this.parameters.splice(queued, 1);
        this.allocatedParameters.set(trial.id, form.hyperParameters.value);
      }
      return trial;
    };
    const cancel = V3asV1.prototype.cancelTrialJob;
    V3asV1.prototype.cancelTrialJob = async function (trialJobId, isEarlyStopped) {
      if (this.trialJobs[trialJobId]) {  // known before the trial ends, not after
        this.trialJobs[trialJobId].isEarlyStopped = Boolean(isEarlyStopped);
      }
      return cancel.call(this, trialJobId, isEarlyStopped);
    };
    V3asV1.ownParameters = true;
  }
  return exported;
};
